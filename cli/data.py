"""``dedn data``: build, convert and inspect feature stores."""

from __future__ import annotations

from pathlib import Path

import click

from dedn.data.progress import tqdm_progress

__all__ = ["convert", "convert_hdf5_cmd", "convert_xlsa17_cmd", "data", "extract", "inspect", "synth"]

_DTYPE = click.Choice(["float16", "float32"])


@click.group()
def data() -> None:
    """Build, convert and inspect Parquet feature stores.

    \b
    Examples:
      dedn data synth --builtin --out data/tiny
      dedn data synth --from ../shared/data/zsl/CUB --out data/synth-cub
      dedn data extract --images CUB --image-list CUB/image_labels.csv --att-splits CUB/att_splits.mat --out data/cub
      dedn data inspect data/synth-cub
    """


@data.group()
def convert() -> None:
    """Convert standard benchmark files into a feature store.

    \b
    Examples:
      dedn data convert xlsa17 --att-splits CUB/att_splits.mat --features CUB/res101.mat --out data/cub
      dedn data convert hdf5 --features CUB_feature_map.hdf5 --att-splits CUB/att_splits.mat --out data/cub14
    """


def _common(f):
    for opt in reversed(
        [
            click.option("--out", type=click.Path(path_type=Path), required=True, help="Store folder to create."),
            click.option("--name", default=None, help="Dataset name (default: from the input's folder or file)."),
            click.option(
                "--val-classes",
                type=click.Path(path_type=Path),
                default=None,
                help="Class-name list of validation-unseen classes (xlsa17 valclasses1.txt).",
            ),
            click.option(
                "--attribute-names",
                type=click.Path(path_type=Path),
                default=None,
                help="attributes.txt, predicates.txt or attributes.mat.",
            ),
            click.option(
                "--attribute-vectors",
                type=click.Path(path_type=Path),
                default=None,
                help="*_attribute.pkl (D x G numpy array, loaded with a restricted unpickler).",
            ),
            click.option("--dtype", type=_DTYPE, default="float16", show_default=True, help="Stored feature dtype."),
            click.option("--chunk-rows", type=click.IntRange(min=1), default=None, help="Images per streamed chunk."),
            click.option("--seed", type=int, default=0, show_default=True, help="Seeds the validation split."),
            click.option("--overwrite", is_flag=True, help="Replace an existing store."),
        ]
    ):
        f = opt(f)
    return f


def _check_store_out(out: Path, command: str, inputs: list[object], kw: dict[str, object]) -> None:
    """Before any work: the store folder to create is no input (nor holds or lies inside one), not the working
    folder or an ancestor, and an existing one is replaced only with --overwrite when it is a dedn store."""
    from dedn.errors import DednInputError
    from dedn.outputs import check_output

    for key in ("val_classes", "attribute_names", "attribute_vectors"):
        given = Path(str(kw[key])) if kw.get(key) is not None else None
        if given is not None and not given.is_file():
            what = "is a folder, not a file" if given.is_dir() else "no such file"
            raise DednInputError(given, "--" + key.replace("_", "-"), what)
    companions = [kw.get(k) for k in ("val_classes", "attribute_names", "attribute_vectors")]
    check_output(
        out,
        inputs=[Path(str(p)) for p in [*inputs, *companions] if p is not None],
        command=command,
        overwrite=bool(kw.get("overwrite")),
        kind="store",
    )


@convert.command("xlsa17")
@click.option("--att-splits", type=click.Path(path_type=Path), required=True, help="att_splits.mat")
@click.option("--features", type=click.Path(path_type=Path), required=True, help="res101.mat (2048 x N pooled).")
@_common
def convert_xlsa17_cmd(att_splits: Path, features: Path, out: Path, chunk_rows: int | None, **kw: object) -> None:
    """xlsa17 att_splits.mat + res101.mat -> store (C=2048, H=W=1).

    Companion files beside att_splits.mat (valclasses1.txt, attribute names, *_attribute.pkl) are
    used unless given explicitly.

    \b
    Examples:
      dedn data convert xlsa17 --att-splits xlsa17/CUB/att_splits.mat --features xlsa17/CUB/res101.mat --out data/cub
      dedn data convert xlsa17 --att-splits AWA2/att_splits.mat --features AWA2/res101.mat --out data/awa2 --dtype float32
    """
    from dedn.data.convert import convert_xlsa17

    _check_store_out(out, "dedn data convert", [att_splits, features], kw)
    meta = convert_xlsa17(att_splits, features, out, chunk_rows=chunk_rows or 2048, progress=tqdm_progress, **kw)  # type: ignore[arg-type]
    click.echo(f"wrote {out} ({meta.num_images} images, fingerprint {meta.fingerprint})")


@convert.command("hdf5")
@click.option("--features", type=click.Path(path_type=Path), required=True, help="Feature-map HDF5 file.")
@click.option("--att-splits", type=click.Path(path_type=Path), default=None, help="att_splits.mat, for class names.")
@_common
def convert_hdf5_cmd(features: Path, out: Path, chunk_rows: int | None, **kw: object) -> None:
    """DAZLE/MSDN/DEDN feature-map HDF5 (feature_map N x C x h x w, 0-based labels/locs) -> store.

    \b
    Examples:
      dedn data convert hdf5 --features CUB_feature_map.hdf5 --att-splits CUB/att_splits.mat \\
          --val-classes CUB/valclasses1.txt --attribute-names CUB/attributes.txt --out data/cub14
      dedn data convert hdf5 --features AWA2_feature_map.hdf5 --attribute-vectors AWA2/AWA2_attribute.pkl --out data/awa2
    """
    from dedn.data.convert import convert_hdf5

    _check_store_out(out, "dedn data convert", [features, kw.get("att_splits")], kw)
    meta = convert_hdf5(features, out, chunk_rows=chunk_rows or 256, progress=tqdm_progress, **kw)  # type: ignore[arg-type]
    click.echo(f"wrote {out} ({meta.num_images} images, fingerprint {meta.fingerprint})")


@data.command()
@click.option(
    "--images", type=click.Path(path_type=Path), required=True, help="Folder the image list's paths lie under."
)
@click.option(
    "--image-list",
    type=click.Path(path_type=Path),
    required=True,
    help="The xlsa17 res101.mat (image_files, 1-based labels) or a CSV with columns image_file,label (1-based). A "
    "relative path is taken as it is under --images; an absolute one (res101.mat) keeps the part from its last "
    "CUB_200_2011 or Animals_with_Attributes2 folder, else from its last images folder (SUN): "
    "/x/MSc/CUB_200_2011/images/a.jpg -> IMAGES/CUB_200_2011/images/a.jpg.",
)
@click.option("--att-splits", type=click.Path(path_type=Path), required=True, help="att_splits.mat")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Store folder to create.")
@click.option(
    "--weights",
    type=click.Path(path_type=Path),
    default=None,
    help="ResNet-101 state_dict (.pth read with weights_only=True, or .safetensors); default: torchvision's "
    "ImageNet weights in torch's cache ($TORCH_HOME/hub/checkpoints/resnet101-63fe2227.pth). Never downloaded.",
)
@click.option("--size", type=click.IntRange(min=32), default=None, help="Image side (default 448; 224 for AWA2).")
@click.option("--dtype", type=_DTYPE, default="float16", show_default=True, help="Stored feature dtype.")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per batch.")
@click.option("--address", default=None, help="Ray cluster to run on ('auto' or host:port); default a local Ray.")
@click.option(
    "--workers", type=click.IntRange(min=1), default=None, help="Trunk actors (default: one per GPU, 1 on CPU)."
)
@click.option("--gpus-per-worker", type=click.FloatRange(min=0), default=None, help="GPUs per actor; fractions share.")
@click.option(
    "--shard-size", type=click.IntRange(min=1), default=None, help="Images per shard written (default ~64 MB)."
)
@click.option(
    "--resume", is_flag=True, help="Continue an interrupted extraction into --out with the shards not yet written."
)
@click.option("--name", default=None, help="Dataset name (default: the split file's folder).")
@click.option("--val-classes", type=click.Path(path_type=Path), default=None, help="valclasses1.txt")
@click.option("--attribute-names", type=click.Path(path_type=Path), default=None, help="attributes.txt and similar.")
@click.option("--attribute-vectors", type=click.Path(path_type=Path), default=None, help="*_attribute.pkl")
@click.option("--seed", type=int, default=0, show_default=True, help="Seeds the validation split.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def extract(
    images: Path,
    image_list: Path,
    att_splits: Path,
    out: Path,
    weights: Path | None,
    size: int | None,
    dtype: str,
    batch_size: int,
    address: str | None,
    workers: int | None,
    gpus_per_worker: float | None,
    shard_size: int | None,
    resume: bool,
    **kw: object,
) -> None:
    """Images -> store: torchvision's ResNet-101 trunk (ImageNet weights, avgpool and fc dropped) over every image
    in a split, as the released preprocessing does (RGB, resize the shorter side, centre crop, ImageNet
    normalisation), streamed with Ray Data: decoding on CPU tasks, the trunk on GPU actors (CPU without GPUs).

    Every input is checked before any image is read. Shards are written as they come in OUT.extracting; an
    interrupted extraction continues with --resume, and the store it ends with equals an uninterrupted one.

    \b
    Examples:
      dedn data extract --images CUB --image-list xlsa17/CUB/res101.mat --att-splits xlsa17/CUB/att_splits.mat --out data/cub14
      dedn data extract --images AWA2 --image-list AWA2/image_labels.csv --att-splits AWA2/att_splits.mat --out data/awa2 --address auto
      dedn data extract --images CUB --image-list CUB/image_labels.csv --att-splits CUB/att_splits.mat --out data/cub14 --resume
    """
    from dedn.data.extract import assemble, open_work, plan_extraction
    from dedn.trunk import default_weights_path

    _check_store_out(out, "dedn data extract", [images, image_list, att_splits, weights], kw)
    overwrite = bool(kw.pop("overwrite"))
    plan = plan_extraction(
        images=images,
        image_list=image_list,
        att_splits=att_splits,
        out=out.absolute(),
        weights=weights or default_weights_path(),
        size=size,
        dtype=dtype,
        shard_rows=shard_size,
        **kw,  # type: ignore[arg-type]
    )
    if address is None:
        from cluster.connect import local_ray_on_loopback

        local_ray_on_loopback()
    from cluster.connect import ray_session
    from cluster.extract import extract_shards, pool_size

    with ray_session(address):
        n, per = pool_size(workers, gpus_per_worker)
        todo = open_work(plan, resume)
        from tqdm import tqdm

        left = sum(len(plan.shard_range(i)) for i in todo)
        bar = tqdm(total=len(plan.files), initial=len(plan.files) - left, desc="extract", unit="img", disable=None)
        with bar:  # shown on a terminal only
            extract_shards(
                plan, todo, workers=n, gpus_per_worker=per, batch_size=batch_size, tick=lambda n: bar.update(n) and None
            )
    meta = assemble(plan, tqdm_progress, overwrite=overwrite)
    click.echo(
        f"wrote {out} ({meta.num_images} images, {plan.shape[0]}x{plan.shape[1]}x{plan.shape[2]} features, "
        f"fingerprint {meta.fingerprint})"
    )


@data.command()
@click.option("--out", type=click.Path(path_type=Path), required=True, help="Store folder to create.")
@click.option("--builtin", "builtin", is_flag=True, help="The tiny built-in dataset (no external file).")
@click.option(
    "--pictures",
    is_flag=True,
    help="Instead of a store, a folder of drawn pictures for dedn data extract: six classes in the xlsa17 layout "
    "(images/, image_labels.csv, att_splits.mat) and seeded random ResNet-101 weights (weights.safetensors).",
)
@click.option(
    "--from",
    "source",
    type=click.Path(path_type=Path),
    default=None,
    help="Benchmark folder with att_splits.mat, image_labels.csv and companions (CUB, SUN or AWA2).",
)
@click.option("--channels", "-C", type=click.IntRange(min=1), default=None, help="C (default 64; built-in 32).")
@click.option("--height", "-H", type=click.IntRange(min=1), default=None, help="H (default 7; built-in 4).")
@click.option("--width", "-W", type=click.IntRange(min=1), default=None, help="W (default 7; built-in 4).")
@click.option("--noise", type=click.FloatRange(min=0), default=0.5, show_default=True, help="Noise std.")
@click.option("--signal", type=click.FloatRange(min=0), default=1.0, show_default=True, help="Pattern strength.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--dtype", type=_DTYPE, default="float16", show_default=True)
@click.option("--images-per-class", type=click.IntRange(min=2), default=30, show_default=True, help="Built-in only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing store.")
def synth(
    out: Path,
    builtin: bool,
    pictures: bool,
    source: Path | None,
    channels: int | None,
    height: int | None,
    width: int | None,
    noise: float,
    signal: float,
    seed: int,
    dtype: str,
    images_per_class: int,
    overwrite: bool,
) -> None:
    """Build a semi-synthetic store: real benchmark structure, planted features.

    Attributes (not class identity) explain each image: every attribute has a channel direction and a
    spatial footprint tied to its cluster; presence is sampled from the class's attribute strengths.
    Same seed, same bytes.

    \b
    Examples:
      dedn data synth --builtin --out data/tiny
      dedn data synth --from ../shared/data/zsl/CUB --out data/synth-cub -C 64 -H 7 -W 7
      dedn data synth --from ../shared/data/zsl/AWA2 --out data/synth-awa2 --noise 1.0 --seed 3
      dedn data synth --pictures --out pics --images-per-class 16
    """
    from dedn.data.synth import TINY, BuiltinConfig, SynthConfig, synth_builtin, synth_from_benchmark
    from dedn.errors import DednInputError

    if pictures:
        from dedn.data.pictures import draw_pictures
        from dedn.outputs import check_output, write_output_folder

        if builtin or source is not None:
            raise DednInputError("dedn data synth", "--pictures", "give --pictures alone, without --builtin or --from")
        check_output(out, inputs=[], command="dedn data synth --pictures", overwrite=overwrite, kind="folder")
        n = images_per_class
        build = lambda folder: draw_pictures(folder, n, seed)  # noqa: E731
        write_output_folder(out, "dedn data synth --pictures", build, overwrite=overwrite)
        click.echo(
            f"wrote {out} ({6 * n} pictures of 6 classes, 2 unseen; random trunk weights {out}/weights.safetensors)"
        )
        return

    if builtin == (source is not None):
        raise DednInputError("dedn data synth", "--builtin/--from", "give exactly one of --builtin or --from FOLDER")
    _check_store_out(out, "dedn data synth", [source], {"overwrite": overwrite})
    base = TINY if builtin else SynthConfig()
    cfg = SynthConfig(
        channels=channels or base.channels,
        height=height or base.height,
        width=width or base.width,
        noise=noise,
        signal=signal,
        seed=seed,
        dtype=dtype,
    )
    if builtin:
        meta = synth_builtin(
            out, cfg, BuiltinConfig(images_per_class=images_per_class), overwrite=overwrite, progress=tqdm_progress
        )
    else:
        assert source is not None
        meta = synth_from_benchmark(source, out, cfg, overwrite=overwrite, progress=tqdm_progress)
    click.echo(f"wrote {out} ({meta.num_images} images, fingerprint {meta.fingerprint})")


@data.command()
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--verify", is_flag=True, help="Re-read all features: check finiteness and the fingerprint.")
def inspect(store: Path, verify: bool) -> None:
    """Print a store's summary: splits, classes, attributes, shape, size, fingerprint, presets.

    \b
    Examples:
      dedn data inspect data/tiny
      dedn data inspect data/synth-cub --verify
    """
    from dedn.data.inspect import summary

    click.echo(summary(store, verify=verify))
