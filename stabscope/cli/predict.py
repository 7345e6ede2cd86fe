"""``stabscope predict``: the per-layer profile the theory predicts at init, without training.

stabscope predict sample_models/gpt.py --set norm=post --set depth=24
stabscope predict --depth 96 --width 512 --norm post
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from ..errors import UsageError
from . import values
from .common import Quiet, app, err, fail

if TYPE_CHECKING:
    from ..theory import ModelDescription, Prediction

_SEVERITY_STYLE = {"ok": "green", "warning": "yellow", "error": "red"}


@app.command()
def predict(
    script: Annotated[
        Path | None,
        typer.Argument(help="Model script to build and read (omit it to describe a model)."),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="CONFIG override for SCRIPT (repeatable).")
    ] = None,
    depth: Annotated[int | None, typer.Option(help="Number of blocks.")] = None,
    width: Annotated[int | None, typer.Option(help="Model width d.")] = None,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    ffn: Annotated[float, typer.Option(help="Feed-forward width over model width.")] = 4.0,
    norm: Annotated[str, typer.Option(help="pre, post or deepnorm.")] = "pre",
    init: Annotated[str, typer.Option(help="xavier, torch (nn.Linear default) or normal.")] = (
        "xavier"
    ),
    init_std: Annotated[float, typer.Option(help="Weight std for --init normal.")] = 0.02,
    seq: Annotated[int, typer.Option(help="Sequence length T.")] = 128,
    bidirectional: Annotated[
        bool, typer.Option("--bidirectional", help="No causal mask (encoder).")
    ] = False,
    dropout: Annotated[float, typer.Option(help="Dropout after attention and FFN.")] = 0.0,
    activation: Annotated[str, typer.Option(help="gelu or relu.")] = "gelu",
    norm_kind: Annotated[str, typer.Option(help="layernorm or rmsnorm.")] = "layernorm",
    alpha: Annotated[
        float | None,
        typer.Option(help="Residual skip scale α of post/deepnorm (default 1; DeepNet's)."),
    ] = None,
    beta: Annotated[
        float | None,
        typer.Option(help="Init gain β of v, o, FFN (default 1; DeepNet's for deepnorm)."),
    ] = None,
    input_var: Annotated[float, typer.Option(help="Variance of the first block's input.")] = 1.0,
    input_corr: Annotated[
        float, typer.Option(help="Token correlation of the first block's input.")
    ] = 0.0,
    grad_corr: Annotated[
        float,
        typer.Option(
            help="Token correlation of the loss gradient at the last block's output "
            "(a model script's is measured)."
        ),
    ] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the prediction as JSON.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Also write the prediction to this file.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed for building SCRIPT's model.")] = 0,
    quiet: Quiet = False,
) -> None:
    """Predict per-layer activation rms, gradient rms and token correlation at init."""
    from ..store.rundir import refuse_output_in_run
    from ..theory import DescriptionError, ModelDescription
    from ..theory.prediction import PREDICTION_FILE

    try:
        values.seed(seed)
        values.positive_finite(ffn, "--ffn", "4")
        values.positive_finite(input_var, "--input-var", "1")
        values.positive_finite(alpha, "--alpha", "1")  # None: the placement's own
        values.positive_finite(beta, "--beta", "1")
        if out is not None:
            refuse_output_in_run(out, "--out", PREDICTION_FILE)
            values.output_file(out, "--out")
        if script is not None:
            if depth is not None or width is not None:
                raise UsageError(
                    "give either a model script or a description (--depth/--width), not both",
                    hint="drop SCRIPT, or drop --depth/--width and use --set on the script",
                )
            desc = _describe_script(script, set_ or [], seed)
            title = f"{script.name}"
        else:
            if set_:
                raise UsageError(
                    "--set needs a model script", hint="stabscope predict SCRIPT --set k=v"
                )
            if depth is None or width is None:
                raise UsageError(
                    "nothing to predict: give a model script, or --depth and --width",
                    hint="e.g. stabscope predict --depth 96 --width 512 --norm post",
                )
            try:
                desc = ModelDescription(
                    depth=depth, width=width, heads=heads, ffn=ffn, norm=norm, init=init,
                    init_std=init_std, seq=seq, causal=not bidirectional, dropout=dropout,
                    activation=activation, norm_kind=norm_kind, alpha=alpha, beta=beta,
                    input_var=input_var, input_corr=input_corr, grad_corr=grad_corr,
                )  # fmt: skip
            except DescriptionError as e:
                raise UsageError(str(e), hint="see `stabscope predict --help`") from None
            title = f"{depth}-layer {norm} model, width {width}"
        prediction = _run(desc, quiet)
        if out is not None:
            values.write_output(out, prediction.to_json(), "--out")
    except UsageError as e:
        raise fail(e) from None
    if as_json:
        typer.echo(prediction.to_json(), nl=False)
    else:
        print_prediction(prediction, title, quiet)


def _describe_script(script: Path, sets: list[str], seed: int) -> ModelDescription:
    from ..drivers.describe_model import NotCovered, describe
    from ..drivers.profile import build_for_inspection
    from ..drivers.script import load_script, parse_set
    from ..structure import discover

    loaded = load_script(script, parse_set(sets))
    model, forward = build_for_inspection(loaded, seed)
    try:
        return describe(model, discover(model, forward), forward)
    except NotCovered as e:
        raise UsageError(
            f"{script.name}: the theory does not cover this model: {e}",
            hint="describe it instead: stabscope predict --depth N --width D --norm pre|post",
        ) from None


def _run(desc: ModelDescription, quiet: bool) -> Prediction:
    """The prediction, with a progress bar when it takes a while (O(depth·seq²))."""
    from ..theory import predict

    if quiet or desc.depth * desc.seq**2 < 5_000_000:
        return predict(desc)
    with err.status(f"propagating {desc.depth} blocks × {desc.seq}² token moments"):
        return predict(desc)


def print_prediction(prediction: Prediction, title: str, quiet: bool = False) -> None:
    """The per-layer table, the headline and the verdict on stderr (the verdict only when
    ``quiet``)."""
    head, verdict = prediction.headline, prediction.verdict
    style = _SEVERITY_STYLE[verdict["severity"]]
    reasons = "; ".join(verdict["reasons"]) or "no vanishing or exploding gradients, no collapse"
    line = f"verdict: [{style}]{verdict['severity']}[/] — {escape(reasons)}"
    if quiet:
        err.print(line, soft_wrap=True)
        return
    from rich.table import Table

    table = Table(title=f"predicted at init: {escape(title)}")
    for col in ("layer", "act rms", "act var", "grad rms (rel. last)", "token corr"):
        table.add_column(col, justify="right")
    for layer in prediction.layers:
        table.add_row(
            escape(layer.module or str(layer.index)),
            f"{layer.act_rms:.4g}",
            f"{layer.act_var:.4g}",
            f"{layer.grad_rms_rel:.4g}",
            f"{layer.token_corr:.3f}",
        )
    err.print(table)
    err.print(
        f"gradient rms first/last layer ×{head['grad_ratio_first_last']:.3g}; activation rms "
        f"last/first ×{head['act_rms_growth']:.3g}; final token correlation "
        f"{head['final_token_corr']:.3f}"
    )
    err.print(line, soft_wrap=True)
