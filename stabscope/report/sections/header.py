"""Section 1: what each run is: metadata, model structure, schedule, and how it ended."""

from __future__ import annotations

from collections import Counter
from typing import Any

from ...store import RunMeta
from ..figures import esc
from ..runs import Run
from . import Context, Section


def _status(run: Run) -> str:
    status = run.status
    # `interrupted`, `killed`, `running` (a live writer) and `unfinished` say more in a line.
    text = run.state.detail if run.state is not None else status
    html = f'<span class="status status-{esc(status)}">{esc(text)}</span>'
    error = run.meta.error
    if error is not None:
        html += f"<br><code>{esc(error.get('type', ''))}: {esc(error.get('message', ''))}</code>"
    return html


def _config(cfg: Any) -> str:
    if not isinstance(cfg, dict) or not cfg:
        return "–"
    return ", ".join(f"{esc(k)}={esc(v)}" for k, v in cfg.items())


def _script_settings(meta: RunMeta) -> str:
    """A model script's CONFIG overrides, or a training script's own command-line arguments."""
    info = meta.run_info
    if info.get("script_config"):
        return _config(info["script_config"])
    args = info.get("script_args")
    return f"<code>{esc(' '.join(map(str, args)))}</code>" if args else "–"


def _structure(run: Run) -> str:
    meta = run.meta
    modules = meta.modules
    params = sum(int(p.get("numel") or 0) for p in meta.parameters)
    types = Counter(str(m.get("type")) for m in modules if m.get("name") != "<root>")
    top = ", ".join(f"{n}× {esc(t)}" for t, n in types.most_common(6))
    lines = [
        f"{len(modules)} modules, {params:,} parameters",
        f"depth axis: {len(run.layers)} layers ({esc(run.depth_source)})",
    ]
    if top:
        lines.append(f"types: {top}")
    structure = run.structure
    if structure is None:
        lines.append("blocks and residual branches: not detected in this run")
    else:
        blocks = structure.get("blocks") or []
        placements = Counter(str(b.get("placement")) for b in blocks)
        stacks = Counter(str(b.get("stack") or "single stack") for b in blocks)
        heads = sorted({a.get("heads") for b in blocks for a in b.get("attention") or []} - {None})
        found = "recognised" if structure.get("recognised") else "partly recognised"
        kinds = [f"{n}× {esc(p)}-norm" for p, n in placements.items()]
        kinds += [f"{n}× {esc(s)}" for s, n in stacks.items()]
        if heads:
            kinds.append(f"heads {', '.join(map(str, heads))}")
        if blocks:
            lines.append(f"{len(blocks)} blocks ({found}): " + "; ".join(kinds))
        else:
            lines.append("no transformer blocks recognised")
        lines += [f"<i>{esc(note)}</i>" for note in structure.get("notes") or []]
    return "<br>".join(lines)


def _schedule(meta: RunMeta) -> str:
    schedule = meta.config.get("schedule")
    if not isinstance(schedule, dict):
        return "–"
    text = f"every step below {schedule.get('dense')}, then every {schedule.get('every')}"
    if schedule.get("log"):
        text += f", and {schedule.get('per_decade')} log-spaced steps per decade"
    return esc(text)


def _nonfinite(meta: RunMeta) -> str:
    first = meta.first_nonfinite
    if not first:
        return "none recorded"
    return "<br>".join(
        f"{esc(d)}: {esc(w.get('module'))} at step {esc(w.get('step'))}" for d, w in first.items()
    )


def _never_fired(meta: RunMeta) -> str:
    never = meta.hooks_never_fired
    parts = []
    for kind, names in never.items():
        if names:
            shown = ", ".join(esc(n) for n in names[:4])
            more = f" and {len(names) - 4} more" if len(names) > 4 else ""
            parts.append(f"{esc(kind)}: {shown}{more}")
    return "<br>".join(parts) or "–"


def _steps(run: Run) -> str:
    meta = run.meta
    return esc(
        f"{meta.get('steps', '–')} trained, {meta.get('recorded_steps', '–')} recorded, "
        f"{run.rows:,} rows in {len(run.files)} readable parts"
    )


def _training(meta: RunMeta) -> str:
    """``AdamW, on cuda, seed 0``: each part where the run knows it (a zero-code run records
    no device), named, so a lone seed does not read as a device."""
    info = meta.run_info
    said = [str(info["optimizer"])] if "optimizer" in info else []
    said += [
        f"{word} {info[key]}" for key, word in (("device", "on"), ("seed", "seed")) if key in info
    ]
    return esc(", ".join(said) or "–")


def _times(meta: RunMeta) -> str:
    return esc(f"{meta.started or '–'} → {meta.finished or '–'}")


def _row(label: str, cells: list[str]) -> str:
    return f"<tr><th>{esc(label)}</th>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"


def _notes(meta: RunMeta) -> str:
    """meta.json's notes, as ``profile`` and ``summary`` print them (two trained models
    recorded as one, a new training phase, modules left unhooked), one per line."""
    return "<br>".join(esc(n) for n in meta.notes) or "–"


def header_section(ctx: Context) -> Section:
    runs = [d.run for d in ctx.data]
    rows = [
        ("status", [_status(r) for r in runs]),
        ("directory", [f"<code>{esc(r.path)}</code>" for r in runs]),
        ("model", [esc(r.meta.model_type or "–") for r in runs]),
        ("script", [esc(r.meta.run_info.get("script") or "–") for r in runs]),
        ("script config or arguments", [_script_settings(r.meta) for r in runs]),
        ("optimizer, device, seed", [_training(r.meta) for r in runs]),
        ("structure", [_structure(r) for r in runs]),
        ("steps", [_steps(r) for r in runs]),
        ("schedule", [_schedule(r.meta) for r in runs]),
        ("preset", [esc(r.meta.config.get("preset", "–")) for r in runs]),
        ("started, finished", [_times(r.meta) for r in runs]),
        ("first non-finite", [_nonfinite(r.meta) for r in runs]),
        ("hooks that never fired", [_never_fired(r.meta) for r in runs]),
        ("notes", [_notes(r.meta) for r in runs]),
        ("versions", [_config(r.meta.versions) for r in runs]),
    ]
    head = "<tr><th></th>" + "".join(f"<th>{esc(r.name)}</th>" for r in runs) + "</tr>"
    table = '<table class="runs">' + head + "".join(_row(k, v) for k, v in rows) + "</table>"
    notes = [w for r in runs for w in r.warnings]
    return Section("header", "Runs", body=[table], notes=notes)
