"""Bad and hostile input through the dedn CLI: one test module per class of the safety policy (README)."""
