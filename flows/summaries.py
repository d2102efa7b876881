"""Markdown for the flow's Prefect artifacts, built from the stage reports."""

from __future__ import annotations

import base64
from pathlib import Path


def clean_summary_markdown(report: dict) -> str:
    """The clean report as a markdown artifact."""
    lines = [
        "# Clean data",
        "",
        f"**{report['kept']}** kept of **{report['ingested']}** ingested; "
        f"**{report['quarantined_total']}** quarantined.",
        "",
        "| quarantine reason | rows |",
        "| --- | ---: |",
        *(f"| {reason} | {count} |" for reason, count in report["quarantined"].items()),
        "",
        "| class | train | val | test | total |",
        "| --- | ---: | ---: | ---: | ---: |",
        *(
            f"| {label} | {c['train']} | {c['val']} | {c['test']} | {c['total']} |"
            for label, c in report["per_class"].items()
        ),
    ]
    expectations = report.get("expectations")
    if expectations:
        verdict = "passed" if expectations["success"] else "failed"
        lines += ["", f"Great Expectations: **{verdict}** ({expectations['evaluated']} checks)"]
        lines += [
            f"- {'CRITICAL' if f['critical'] else 'warning'}: `{f['expectation']}` {f['kwargs']}"
            for f in expectations["failed"]
        ]
    return "\n".join(lines)


def training_summary_markdown(card: dict, summary: dict) -> str:
    """The model card and training figures as a markdown artifact."""
    losses = summary.get("final_losses") or card.get("final_losses") or {}
    rows = [
        ("family", card.get("family")),
        ("steps", card.get("steps")),
        ("data version", card.get("data_version")),
        ("model version", card.get("model_version")),
        ("device", card.get("device")),
        ("processes (DDP)", card.get("world_size")),
        ("images/s", summary.get("images_per_second", card.get("images_per_second"))),
        *((f"final {name}", value) for name, value in losses.items()),
    ]
    table = ["| | |", "| --- | --- |", *(f"| {k} | {v} |" for k, v in rows if v is not None)]
    return "\n".join(["# Generator training", "", *table])


def sample_grid_markdown(png: Path) -> str:
    """The sample grid inline (a data URI), so the artifact needs no file server."""
    encoded = base64.b64encode(png.read_bytes()).decode()
    return f"# Samples, one row per class\n\n![samples](data:image/png;base64,{encoded})"


def loop_summary_markdown(loop: dict) -> str:
    """One table for the whole run: per attempt, the gates, acceptance and whether it helped;
    then the end state in one line, and the verdict from the rounds that promoted."""
    state = "promoted" if loop.get("result") == "promoted" else "FAILED"
    lines = [
        "# Closed loop",
        "",
        f"**{state}**: {loop.get('message', '')}",
        "",
        "| round | attempt | gates | failed gates | accepted | promoted | "
        "scarce: real only | scarce: + synthetic | delta | FID / floor |",
        "| ---: | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in loop["attempts"]:
        v = r.get("validation", {})
        gates = v.get("gates", {})
        util = v.get("utility", {})
        failed = ", ".join(n for n, g in gates.items() if n != "passed" and not g["passed"])
        fid_ratio = gates.get("fid_ratio", {}).get("value")
        lines.append(
            f"| {r['round']} | {r['attempt']} | {'pass' if r['passed'] else 'FAIL'} | "
            f"{failed or '-'} | {v.get('accepted', '-')} | "
            f"{r.get('promotion', {}).get('promoted', 0)} | {util.get('real_only', '-')} | "
            f"{util.get('real_plus_synthetic', '-')} | {_signed(util.get('delta'))} | "
            f"{fid_ratio if fid_ratio is not None else '-'} |"
        )
    verdict = loop.get("verdict")
    if verdict:
        lines += ["", verdict]
    return "\n".join(lines)


def helped_verdict(validation: dict) -> str:
    """One sentence: did the accepted synthetic data help at the scarce size, and by how much."""
    util = validation.get("utility", {})
    delta = util.get("delta")
    if delta is None:
        return "No utility figure was measured."
    scarce = util.get("scarce", {}).get("real_per_class", "?")
    verb = "helped" if delta > 0 else ("did not change" if delta == 0 else "hurt")
    return (
        f"At {scarce} real images per class, the accepted synthetic data **{verb}** the "
        f"downstream classifier: {util.get('real_only')} -> {util.get('real_plus_synthetic')} "
        f"test accuracy ({_signed(delta)})."
    )


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"
