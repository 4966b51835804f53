"""The Tune callback that signs the search state ``dedn search --resume`` will unpickle.

Tune pickles its experiment state (tuner.pkl, the searcher state, each trial's params) and unpickles it on
restore; :mod:`tracking.integrity` refuses to restore a folder whose files do not carry this search's
signatures, so a replaced pickle never runs. This module builds the callback that keeps those signatures
current while the search runs.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

__all__ = ["resume_signer"]


def resume_signer(exp: str) -> Any:
    """The Tune callback that signs the state ``--resume`` will unpickle (module level: tuner.pkl, which
    holds the callbacks, names it by reference and a restored search keeps signing)."""
    return _signer_class()(exp)


@functools.cache
def _signer_class() -> type:
    """``ResumeSigner``, a ray.tune.Callback, built on first use so importing this module needs no Ray."""
    import logging

    from ray.tune import Callback

    from tracking.integrity import StateSigner, signing_key

    log = logging.getLogger(__name__)

    class ResumeSigner(Callback):
        """Signs the files Tune will unpickle on restore (tracking.integrity). Tune calls ``get_state``
        inside its own save, after writing the experiment and searcher state to its driver staging folder
        and before copying that folder into the experiment folder, so each version is signed before it
        reaches the experiment folder. Step ends (at most every 2 s) and the experiment's end sign again,
        for what Tune writes between saves (a trial's params.pkl or error.pkl)."""

        def __init__(self, exp: str) -> None:
            self.exp = exp
            self._trials: list[Any] | None = None
            self._signer: StateSigner | None = None
            self._last = 0.0

        def __reduce__(self) -> tuple[Any, tuple[str]]:
            return (resume_signer, (self.exp,))

        def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
            self._trials = trials  # Tune's own list: holds the trials its next save writes

        def on_step_end(self, iteration: int, trials: list[Any], **info: Any) -> None:
            self._trials = trials
            if time.monotonic() - self._last >= 2.0:
                self._sign()

        def on_experiment_end(self, trials: list[Any], **info: Any) -> None:
            self._trials = trials
            self._sign()

        def get_state(self) -> dict[str, Any] | None:
            self._sign()
            return None  # nothing of ours to save: Tune then writes no callback-state pickle

        def _sign(self) -> None:
            self._last = time.monotonic()
            if not self._trials:
                return
            storage = self._trials[0].storage
            try:
                exp = Path(storage.experiment_fs_path)
                exp = exp if exp.is_dir() else Path(self.exp)
                if self._signer is None or self._signer.exp != exp:
                    self._signer = StateSigner(exp, signing_key())
                staging = _staging_folder(Path(storage.experiment_driver_staging_path))
                if staging is not None:
                    self._signer.sign(staging)
            except Exception as e:  # never fail the search over it: a later --resume is refused instead
                log.warning("could not sign the search state for --resume: %s: %s", type(e).__name__, e)

    return ResumeSigner


def _staging_folder(named: Path) -> Path | None:
    """This session's driver staging folder of the experiment: ``<Ray session>/artifacts/<time>/<name>/
    driver_artifacts``. Trials restored by ``--resume`` keep the ``<time>`` of the session that created
    them, so the folder their storage names may not exist; the newest sibling for the same experiment is
    the one this session's Tune writes."""
    try:
        found = [p for p in named.parents[2].glob(f"*/{named.parent.name}/{named.name}") if p.is_dir()]
        return max(found, key=lambda p: p.stat().st_mtime) if found else None
    except (OSError, IndexError):
        return None
