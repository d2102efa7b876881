"""Markdown for the flow's Prefect artifacts, built from the stage reports."""

from __future__ import annotations

import base64
from pathlib import Path


def clean_summary_markdown(report: dict, sheet: Path | None = None) -> str:
    """The clean report as a markdown artifact; with `sheet` (clean.near_duplicate_sheet)
    and near-duplicates on it, the sheet inline (a data URI) under its path."""
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
    pairs = report.get("near_duplicate_sheet", {}).get("pairs", 0)
    if sheet is not None and pairs and Path(sheet).is_file():
        encoded = base64.b64encode(Path(sheet).read_bytes()).decode()
        lines += [
            "",
            f"## Near-duplicates removed ({pairs} shown)",
            "",
            f"Each removed image (left) beside the kept image it matched (right): `{sheet}`",
            "",
            f"![near-duplicates](data:image/png;base64,{encoded})",
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
    result = loop.get("result")
    state = {"promoted": "promoted", "nothing promoted": "nothing promoted"}.get(result, "FAILED")
    lines = [
        "# Closed loop",
        "",
        f"**{state}**: {loop.get('message', '')}",
        "",
        "| round | attempt | family | gates | failed gates | accepted | promoted | "
        "baseline | + synthetic | gain [95% interval] | FID / floor |",
        "| ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for r in loop["attempts"]:
        v = r.get("validation", {})
        gates = v.get("gates", {})
        decisive = _decisive(v.get("utility") or {})
        failed = ", ".join(n for n, g in gates.items() if n != "passed" and not g["passed"])
        fid_ratio = gates.get("fid_ratio", {}).get("value")
        lines.append(
            f"| {r['round']} | {r['attempt']} | "
            f"{r.get('params', {}).get('train', {}).get('family', '-')} | "
            f"{'pass' if r['passed'] else 'FAIL'} | "
            f"{failed or '-'} | {v.get('accepted', '-')} | "
            f"{r.get('promotion', {}).get('promoted', 0)} | {decisive.get('baseline', '-')} | "
            f"{decisive.get('baseline+synthetic', '-')} | {_gain(decisive)} | "
            f"{fid_ratio if fid_ratio is not None else '-'} |"
        )
    reasons = [
        f"- round {r['round']} attempt {r['attempt']}: {r['retrain_reason']}"
        for r in loop["attempts"]
        if r.get("retrain_reason")
    ]
    if reasons:
        lines += ["", "Retrains, and why:", *reasons]
    lines += [pool_retired_markdown(r) for r in loop["attempts"] if r.get("pool_retired")]
    lines += [text for text in map(refresh_markdown, loop["attempts"]) if text]
    if loop.get("requests"):
        lines += ["", "Requests (data/feedback, `label,extra`):", *requests_markdown(loop)]
    verdict = loop.get("verdict")
    if verdict:
        lines += ["", verdict]
    if loop.get("bakeoff"):
        lines += ["", bakeoff_table_markdown(loop["bakeoff"])]
    util = loop.get("utility")
    if util:
        lines += ["", utility_table_markdown(util)]
    privacy = loop.get("privacy")
    if privacy:
        lines += ["", privacy_table_markdown(privacy)]
    return "\n".join(lines)


def refresh_markdown(record: dict) -> str:
    """An attempt's refresh of full classes in words ('' when it planned none)."""
    refresh = (record.get("validation", {}).get("utility") or {}).get("refresh")
    if not refresh:
        return ""
    gap = refresh["delta_vs_pool"]
    where = f"round {record['round']} attempt {record['attempt']}"
    rows = ", ".join(f"{c}: {n}" for c, n in refresh["replacing_per_class"].items() if n)
    figure = f"{_points(gap['mean'])} [{_points(gap['low'])}, {_points(gap['high'])}] points"
    replaced = (record.get("promotion") or {}).get("replaced", 0)
    if refresh["kept"] and replaced:
        retired = record["promotion"].get("retired_shard")
        return (
            f"\n{where}: refreshed full classes ({rows}): {replaced} pooled rows replaced, "
            f"retired to {retired}; {figure} on the {refresh['compared_on']} classes against "
            "the pool it replaced"
        )
    why = (
        "scored at least as well as the pool, but the attempt promoted nothing"
        if refresh["kept"]
        else "scored below the pool it would replace"
    )
    return f"\n{where}: a refresh of full classes ({rows}) {why}: {figure}; the pool is unchanged"


def _points(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}"


def requests_markdown(loop: dict) -> list[str]:
    """One line per requested class: met, or not and why."""
    out = []
    for label, a in loop.get("requests", {}).items():
        held = f" (pool {a['pooled']} of target {a['target']})" if "pooled" in a else ""
        state = "met" if a.get("met") else f"not met: {a.get('why')}"
        out.append(f"- {label}: {a.get('asked')} more asked, {state}{held}")
    return out


def pool_retired_markdown(record: dict) -> str:
    """One paragraph: the pool shards an attempt retired before fuse, why, how to restore."""
    r = record["pool_retired"]
    return (
        f"\n**Pool retired** (round {record['round']} attempt {record['attempt']}): "
        f"{r['rows']} rows in {len(r['shards'])} shard(s) moved to `retired/`, because "
        f"{r['reason']} (drift FID {r['drift_fid']:.3f}, threshold {r['drift_threshold']}). "
        f"Restore one with `{r['restore']}`."
    )


def bakeoff_table_markdown(table: dict) -> str:
    """The family bake-off: per family its cost, fidelity and utility, ranked; the winner."""
    lines = [
        f"## Family bake-off: **{table.get('winner') or 'none'}** wins",
        "",
        f"Ranked by: {table.get('rule', '')}.",
        "",
        "| rank | family | gates | steps (best) | train s | sample img/s | FID / floor | "
        "precision | recall | coverage | consistency | utility gain [95% interval] |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    rows = sorted(table.get("rows", []), key=lambda r: r.get("rank") or 1_000)
    for r in rows:
        if r.get("status") != "ok":
            lines.append(f"| - | {r['family']} | FAILED: {r.get('error', '')} |" + " |" * 9)
            continue
        gain = _interval(r.get("utility_delta"), r.get("utility_low"), r.get("utility_high"))
        lines.append(
            f"| {r['rank']} | {r['family']} | {'pass' if r['passed'] else 'FAIL'} | "
            f"{r.get('steps', '-')} ({r.get('best_step', '-')}) | {r.get('train_seconds', '-')} | "
            f"{r.get('sample_images_per_second', '-')} | {_cell3(r.get('fid_ratio'))} | "
            f"{_cell3(r.get('precision'))} | {_cell3(r.get('recall'))} | "
            f"{_cell3(r.get('coverage'))} | {_cell3(r.get('class_consistency'))} | "
            f"{gain} {r.get('utility_verdict') or ''} |"
        )
    return "\n".join(lines)


def privacy_table_markdown(privacy: dict) -> str:
    """The privacy figures (tasks/validate/privacy.py) with their sizes and safe ranges."""
    sizes = privacy.get("sizes") or {}
    mem = privacy.get("memorisation") or {}
    dcr = privacy.get("dcr") or {}
    mia = privacy.get("membership") or {}
    lines = [
        f"Privacy: {sizes.get('synthetic', '-')} synthetic, {sizes.get('train', '-')} train, "
        f"{sizes.get('holdout', '-')} hold-out (val + test) images",
        "",
        "| figure | pixels | evaluator features | safe |",
        "| --- | ---: | ---: | --- |",
        f"| memorised (d1/d2 < {_cell(mem.get('threshold'))}) | "
        f"{_cell((mem.get('pixels') or {}).get('ratio'))} | "
        f"{_cell((mem.get('features') or {}).get('ratio'))} | about 0 |",
        f"| DCR: closer to train than to hold-out [95%] | {_share(dcr.get('pixels'))} | "
        f"{_share(dcr.get('features'))} | about 0.5 |",
    ]
    dist, dens = mia.get("distance") or {}, mia.get("density") or {}
    lines.append(
        "| membership AUC [95%]: distance attack (pixels), density attack (features) | "
        f"{_interval(dist.get('auc'), dist.get('low'), dist.get('high'))} | "
        f"{_interval(dens.get('auc'), dens.get('low'), dens.get('high'))} | about 0.5 |"
    )
    lines.append(
        f"\nMembership: {mia.get('members', '-')} members (train) against "
        f"{mia.get('nonmembers', '-')} non-members (hold-out); the density attack's reference "
        f"is {mia.get('reference', '-')} other hold-out images."
    )
    return "\n".join(lines)


def _share(figure: dict | None) -> str:
    figure = figure or {}
    return _interval(figure.get("share"), figure.get("low"), figure.get("high"))


def _interval(value: float | None, low: float | None, high: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f} [{_cell3(low)}, {_cell3(high)}]"


def _cell3(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def utility_table_markdown(util: dict) -> str:
    """The verdict table: per arm, overall and short-class test accuracy; then the gain of
    baseline+synthetic over the baseline with its 95% interval, the test images behind each
    column (and the points one is worth), and what it means."""
    short = util.get("short_classes") or []
    overall, short_fig = util.get("overall") or {}, util.get("short") or {}
    reference = util.get("reference") or {}
    baseline = util.get("baseline", "-")
    # every recipe of the baseline menu val did not choose
    # (tasks/validate/utility_protocol.py, RECIPES)
    others = [(arm, f) for arm, f in reference.items() if arm != "tstr"]
    rows = [
        *(
            (f"{arm} (reference, not chosen on val)", f.get("overall"), f.get("short"))
            for arm, f in others
        ),
        (
            f"{baseline} (baseline, chosen on val)",
            overall.get("baseline"),
            short_fig.get("baseline"),
        ),
        (
            f"{baseline}+synthetic",
            overall.get("baseline+synthetic"),
            short_fig.get("baseline+synthetic"),
        ),
        (
            "synthetic only (TSTR)",
            reference.get("tstr", {}).get("overall"),
            reference.get("tstr", {}).get("short"),
        ),
    ]
    seeds = len(util.get("seeds", []))
    header = f"short classes ({', '.join(short)})" if short else "short classes (none)"
    lines = [
        f"| arm ({seeds} paired seeds, {util.get('test_images')} test images) | overall | "
        f"{header} |",
        "| --- | ---: | ---: |",
        *(f"| {arm} | {_cell(a)} | {_cell(b)} |" for arm, a, b in rows),
        f"| **gain over the baseline** | {_gain(overall)} | {_gain(short_fig) if short else '-'} |",
        f"| test split | {_images(overall)} | {_images(short_fig) if short else '-'} |",
        f"| **verdict** | {overall.get('verdict', '-')} | "
        f"{short_fig.get('verdict', '-') if short else '-'} |",
    ]
    return "\n".join(lines)


def helped_verdict(validation: dict) -> str:
    """One sentence: did the accepted synthetic data beat plain augmentation, and by how much."""
    util = validation.get("utility") or {}
    decisive = _decisive(util)
    if not decisive:
        return "No utility figure was measured."
    where = (
        f"the short classes ({', '.join(util['short_classes'])})"
        if util.get("decisive") == "short"
        else "all classes"
    )
    resolution = util.get("resolution") or {}
    too_small = (
        f"; too few to resolve a gain (one image may be worth at most "
        f"{resolution.get('max_points_per_test_image'):g} points)"
        if resolution.get("resolves") is False
        else ""
    )
    return (
        f"On {where}, the accepted synthetic data: **{decisive.get('verdict')}** against the "
        f"better of real data with and without plain augmentation "
        f"({util.get('baseline', 'real+aug')}, chosen on val): {decisive.get('baseline')} -> "
        f"{decisive.get('baseline+synthetic')} test accuracy, gain {_gain(decisive)} "
        f"over {len(util.get('seeds', []))} paired seeds"
        + (f", on {_images(decisive)}{too_small}." if "test_images" in decisive else ".")
    )


def _images(figure: dict) -> str:
    """A figure's test images and the accuracy points one is worth."""
    n, points = figure.get("test_images"), figure.get("points_per_test_image")
    if n is None:
        return "-"
    return f"{n} test images ({points:g} points each)" if points is not None else f"{n} test images"


def _decisive(util: dict) -> dict:
    return (util.get(util.get("decisive", "")) or {}) if util else {}


def _gain(figure: dict) -> str:
    delta = figure.get("delta") or {}
    if delta.get("mean") is None:
        return "-"
    low, high = delta.get("low"), delta.get("high")
    interval = f" [{_signed(low)}, {_signed(high)}]" if low is not None else " [no interval]"
    return f"{_signed(delta['mean'])}{interval}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.4f}"
