#!/usr/bin/env python3
"""The report of scripts/bench.sh: medians, ratios against plain Envoy, budgets, and a chart.

    scripts/bench_report.py --raw RAW.jsonl --meta META.json --out RESULTS.json [--svg PATH]
    scripts/bench_report.py --results RESULTS.json --svg PATH     (the chart of an earlier run)

Reads the raw runs bench.sh wrote (one JSON line per wrk run, streaming run and memory snapshot),
prints the Markdown tables, writes results.json, and draws the chart as a hand-written SVG:
the throughput ratio to plain Envoy and the added CPU per request, per case, for each build of
the filter and each peer. Standard library only.
"""

import argparse
import json
import math
import statistics
import sys

med = statistics.median

LABELS = {
    "plain": "plain Envoy",
    "wasm": "wasm",
    "native": "native",
    "wasm-fallback": "wasm, fallback",
    "native-fallback": "native, fallback",
    "wasm-baseline": "wasm baseline",
    "aigw": "AI Gateway",
    "litellm": "LiteLLM",
}
COLORS = {
    "wasm": "#4e79a7",
    "native": "#59a14f",
    "wasm-fallback": "#a0cbe8",
    "native-fallback": "#8cd17d",
    "wasm-baseline": "#bab0ac",
    "aigw": "#f28e2b",
    "litellm": "#e15759",
}
# The wasm build's last published run (docs/performance.md, 2026-11-22, 5 rounds of 5 s): "no
# slower than before" means a ratio no lower, and an added CPU time no higher, than these, within
# the run-to-run spread seen on that machine (0.03 of a ratio, 3 µs).
WASM_BEFORE = {"date": "2026-11-22", "1KB_ratio": 0.52, "64KB_ratio": 0.44, "1KB_cpu_added": 31}
RATIO_SLACK, CPU_SLACK = 0.03, 3.0


def label(t):
    return LABELS.get(t, t)


def num(v, unit):
    if v is None:
        return ""
    if unit == "req/s":
        return f"{v:,.0f} req/s"
    if unit == "µs":
        return f"{v / 1000:.2f} ms" if abs(v) >= 10000 else f"{v:.0f} µs"
    return f"{v:.1f} {unit}"


def times(r):
    return f"×{r:.2f}" if r >= 0.1 or r == 0 else f"×{r:.3f}"


def plus(v):
    return f"{v / 1000:+.2f} ms" if abs(v) >= 10000 else f"{v:+.0f} µs"


def plus_list(vals, ref):
    """Per-round differences in one unit, the one that fits ref (the median)."""
    if abs(ref) >= 10000:
        return ", ".join(f"{v / 1000:+.2f}" for v in vals) + " ms"
    return ", ".join(f"{v:+.0f}" for v in vals) + " µs"


def size_text(size):
    return size.replace("KB", " KB").replace("MB", " MB")


def summarize(rows, meta):
    targets = list(meta["targets"])
    others = [t for t in targets if t != "plain"]
    errors = []

    def wrk(kind, size, target):
        got = {r["round"]: r for r in rows
               if r["kind"] == kind and r["size"] == size and r["target"] == target}
        for rnd, r in got.items():
            w = r["wrk"]
            bad = sum(w["errors"].values())
            if bad or not w["requests"]:
                errors.append(f"{kind} {size} {target} round {rnd}: {w['requests']} requests, "
                              f"errors {w['errors']}")
        return got

    cases = []

    def case(cid, name, unit, per_round, higher_is_better, extra=None):
        """per_round: {target: {round: value}}; ratios and differences against plain per round."""
        c = {"id": cid, "case": name, "unit": unit, "higher_is_better": higher_is_better,
             "values": {}, "vs_plain": {}, "per_round": per_round}
        for t, vals in per_round.items():
            if vals:
                c["values"][t] = med(vals.values())
        plain = per_round.get("plain", {})
        for t in others:
            vals = per_round.get(t, {})
            rounds = sorted(set(vals) & set(plain))
            if not rounds:
                continue
            ratios = [vals[r] / plain[r] for r in rounds if plain[r]]
            added = [vals[r] - plain[r] for r in rounds]
            c["vs_plain"][t] = {"ratio": med(ratios) if ratios else None, "ratios": ratios,
                                "added": med(added), "added_per_round": added}
        c.update(extra or {})
        cases.append(c)
        return c

    def rps(w):
        return w["requests"] / (w["duration_us"] / 1e6)

    for size in meta["sizes"]:
        tput = {t: wrk("throughput", size, t) for t in targets}
        case(f"{size}/throughput", f"{size_text(size)} throughput, 32 conn", "req/s",
             {t: {r: rps(x["wrk"]) for r, x in v.items()} for t, v in tput.items()}, True)
        # CPU per request, from the same throughput runs: the cost with the load side's noise
        # mostly removed. AI Gateway's ext_proc server is part of that proxy, so it counts; the
        # rate limit service (BENCH_LIMITED) is shown beside it.
        main = {t: {r: x["cpu_s"] * 1e6 / x["wrk"]["requests"] for r, x in v.items()
                    if x["wrk"]["requests"]} for t, v in tput.items()}
        side = {t: {r: x.get("side_cpu_s", 0) * 1e6 / x["wrk"]["requests"] for r, x in v.items()
                    if x["wrk"]["requests"]} for t, v in tput.items()}
        total = {t: {r: main[t][r] + (side[t][r] if meta["targets"][t] == "aigw" else 0)
                     for r in main[t]} for t in targets}
        case(f"{size}/cpu", f"{size_text(size)} CPU per request", "µs", total, False, {
            "main_cpu_us": {t: med(v.values()) for t, v in main.items() if v},
            "side_cpu_us": {t: med(v.values()) for t, v in side.items() if v and any(v.values())},
            # How busy the proxy's core was: near 1.0 means the proxy, not the load, was the limit.
            "core_busy": {t: med([x["cpu_s"] / (x["wrk"]["duration_us"] / 1e6) for x in v.values()])
                          for t, v in tput.items() if v},
        })
        lat = {t: wrk("latency", size, t) for t in targets}
        case(f"{size}/p50", f"{size_text(size)} p50, 1 conn", "µs",
             {t: {r: x["wrk"]["p50_us"] for r, x in v.items()} for t, v in lat.items()}, False)
        case(f"{size}/p99", f"{size_text(size)} p99, 1 conn", "µs",
             {t: {r: x["wrk"]["p99_us"] for r, x in v.items()} for t, v in lat.items()}, False)
    ttfe = {t: {r["round"]: r["value"] for r in rows if r["kind"] == "ttfe" and r["target"] == t}
            for t in targets}
    case("stream/ttfe", "streaming: time to first event", "µs", ttfe, False)

    snaps = {}
    for r in rows:
        if r["kind"] == "memory":
            snaps.setdefault(r["target"], {})[r["phase"]] = r
    sent = {r["target"]: r["wrk"]["requests"] for r in rows if r["kind"] == "memory-load"}
    memory = {t: {"requests": sent.get(t),
                  "rss_before_mb": s["before"]["rss_kb"] / 1024, "rss_after_mb": s["after"]["rss_kb"] / 1024,
                  "rss_delta_mb": (s["after"]["rss_kb"] - s["before"]["rss_kb"]) / 1024,
                  "heap_delta_mb": (s["after"]["heap"] - s["before"]["heap"]) / 2**20}
              for t, s in snaps.items() if "before" in s and "after" in s}
    return cases, memory, errors


def budgets(cases, memory, meta):
    """Rows of (budget, {build target: (measured text, verdict)})."""
    by_id = {c["id"]: c for c in cases}
    builds = [t for t, k in meta["targets"].items() if k in ("wasm", "native") and t == k]
    rows = []

    def vs(cid, t):
        c = by_id.get(cid)
        return c and c["vs_plain"].get(t)

    def ratio_budget(cid, floor, text):
        cells = {}
        for t in builds:
            v = vs(cid, t)
            cells[t] = ("not measured", "—") if not v else (
                f"×{v['ratio']:.2f} ({', '.join(f'{x:.2f}' for x in v['ratios'])})",
                "met" if v["ratio"] >= floor else "missed")
        rows.append((text, cells))

    def added_budget(cid, ceiling, text):
        cells = {}
        for t in builds:
            v = vs(cid, t)
            cells[t] = ("not measured", "—") if not v else (
                f"{plus(v['added'])} (" + (plus_list(v['added_per_round'], v['added']) if len(v["added_per_round"]) <= 9
                                           else f"median of {len(v['added_per_round'])} runs") + ")",
                "met" if v["added"] <= ceiling else "missed")
        rows.append((text, cells))

    def wasm_no_slower(reference, word, title):
        """The wasm build's 1 KB and 64 KB ratios and 1 KB added CPU against `reference(cid, kind)`."""
        checks = []
        for cid, kind in (("1KB/throughput", "ratio"), ("64KB/throughput", "ratio"), ("1KB/cpu", "added")):
            v, w = vs(cid, "wasm"), reference(cid, kind)
            if v and w is not None:
                checks.append((size_text(cid.split("/")[0]), kind, v[kind], w))
        if not checks:
            return
        text = "; ".join(f"{s} ×{m:.2f} ({word} ×{w:.2f})" if k == "ratio" else f"{s} CPU {plus(m)} ({word} {plus(w)})"
                         for s, k, m, w in checks)
        ok = all((m >= w - RATIO_SLACK) if k == "ratio" else (m <= w + CPU_SLACK) for _, k, m, w in checks)
        cells = {t: ("", "—") for t in builds}
        cells["wasm"] = (text, "met" if ok else "missed")
        rows.append((title, cells))

    ratio_budget("1KB/throughput", 0.85, "1 KB throughput ≥ 0.85 × plain")
    ratio_budget("64KB/throughput", 0.75, "64 KB throughput ≥ 0.75 × plain")
    added_budget("1KB/cpu", 10, "1 KB Envoy CPU per request ≤ +10 µs")
    added_budget("stream/ttfe", 100, "streaming time to first event ≤ +100 µs")
    # Fallback: the same rule with a fallback provider against it without, in the same rounds.
    cells = {}
    c = by_id.get("1KB/throughput")
    for t in builds:
        fb = f"{t}-fallback"
        if not c or fb not in c["per_round"] or not c["per_round"].get(t):
            cells[t] = ("not measured (BENCH_FALLBACK=1)", "—")
            continue
        base, with_fb = c["per_round"][t], c["per_round"][fb]
        rounds = sorted(set(base) & set(with_fb))
        ratios = [with_fb[r] / base[r] for r in rounds]
        cells[t] = (f"×{med(ratios):.2f} of the rule without ({', '.join(f'{x:.2f}' for x in ratios)})",
                    "met" if med(ratios) >= 0.90 else "missed")
    rows.append(("1 KB throughput with fallback within 10% of the same rule without", cells))
    # The wasm build against a baseline build in the same rounds (BENCH_WASM_BASELINE), or else
    # against its last published run.
    if "wasm" in builds and "wasm-baseline" in meta["targets"]:
        def baseline(cid, key):
            w = vs(cid, "wasm-baseline")
            return w[key] if w else None
        wasm_no_slower(baseline, "baseline", "wasm no slower than the baseline build, same rounds")
    elif "wasm" in builds and not meta.get("routed") and not meta.get("model_routed"):
        b = WASM_BEFORE
        published = {"1KB/throughput": "1KB_ratio", "64KB/throughput": "64KB_ratio", "1KB/cpu": "1KB_cpu_added"}
        wasm_no_slower(lambda cid, _: b[published[cid]], "was", f"wasm no slower than its run of {b['date']}")
    # The earlier targets of the filter, for every build.
    added_budget("1KB/p50", 40, "1 KB p50 ≤ +40 µs")
    added_budget("1MB/p50", 2000, "1 MB p50 ≤ +2000 µs")
    cells = {}
    for t in builds:
        m = memory.get(t)
        cells[t] = ("not measured", "—") if not m else (
            f"{m['rss_delta_mb']:+.1f} MB ({m['rss_before_mb']:.0f} → {m['rss_after_mb']:.0f} MB over "
            f"{m['requests']:,} requests)", "met" if abs(m["rss_delta_mb"]) <= 5 else "missed")
    rows.append(("Envoy RSS flat across the memory load (± 5 MB)", cells))
    cells = {t: ("", "—") for t in builds}
    if "wasm" in builds and meta.get("wasm_bytes"):
        cells["wasm"] = (f"{meta['wasm_bytes']:,} bytes", "met" if meta["wasm_bytes"] <= 300_000 else "missed")
    if "native" in builds and meta.get("native_bytes"):
        cells["native"] = (f"{meta['native_bytes']:,} bytes (.so)", "—")
    rows.append(("binary size (release; .wasm ≤ 300 KB)", cells))
    # A build that did not rewrite in the check (a BENCH_* variant) is measured, not judged.
    unverified = set(meta.get("unverified", []))
    for _, cells in rows:
        for t in list(cells):
            if t in unverified or f"{t}-fallback" in unverified:
                measured, verdict = cells[t]
                if verdict != "—":
                    cells[t] = (measured, "not judged: did not rewrite")
    return builds, rows


def tables(cases, memory, meta, builds, budget_rows):
    targets = list(meta["targets"])
    head = ["case"] + [label(t) for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        cells = [c["case"]]
        for t in targets:
            v = c["values"].get(t)
            if v is None:
                cells.append("")
                continue
            text = num(v, c["unit"])
            d = c["vs_plain"].get(t)
            if d:
                text += " " + times(d['ratio']) if c["unit"] == "req/s" else f" ({plus(d['added'])})"
            side = c.get("side_cpu_us", {}).get(t)
            if side is not None and meta["targets"][t] == "aigw":
                text += f", ext_proc {side:.0f} µs of it"
            cells.append(text)
        lines.append("| " + " | ".join(cells) + " |")
    main = "\n".join(lines)
    head = ["budget"] + [label(t) for t in builds]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for text, cells in budget_rows:
        row = [text]
        for t in builds:
            measured, verdict = cells.get(t, ("", "—"))
            row.append(f"{measured}{': ' if measured and verdict != '—' else ''}{verdict if verdict != '—' else ''}"
                       if measured or verdict != "—" else "")
        lines.append("| " + " | ".join(row) + " |")
    return main, "\n".join(lines)


def summary(cases, meta):
    """The short table (README): plain Envoy's value, then each target's ratio or added time."""
    targets = [t for t in meta["targets"] if t != "plain"]
    head = ["case", "plain Envoy"] + [label(t) for t in targets]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in cases:
        if not c["id"].endswith(("/throughput", "/cpu", "/ttfe")):
            continue
        cells = [c["case"], num(c["values"].get("plain"), c["unit"])]
        for t in targets:
            d = c["vs_plain"].get(t)
            cells.append("" if not d else (times(d['ratio']) if c["unit"] == "req/s" else plus(d["added"])))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- chart
def envoy_version(text):
    """1.40.0 out of Envoy's `<sha>/1.40.0/Clean/RELEASE/BoringSSL`."""
    return next((p for p in text.split("/") if p[:1].isdigit() and p.count(".") == 2), text)


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def chart(results, path):
    meta, cases = results["meta"], results["cases"]
    by_id = {c["id"]: c for c in cases}
    sizes = [s for s in ("1KB", "64KB", "1MB") if f"{s}/throughput" in by_id]
    series = [t for t in meta["targets"] if t != "plain"]
    W, H = 980, 470
    panel_w, panel_h, top = 390, 300, 90
    lefts = (90, 580)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           'font-family="Helvetica, Arial, sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="16" font-weight="bold">'
           'llm-filter against plain Envoy, with the peers, in the same run</text>',
           f'<text x="{W / 2}" y="44" text-anchor="middle" fill="#555">{esc(meta["date"])}, {meta["nproc"]} cores '
           f'({esc(meta["cpu"])}), load {esc(meta.get("load", "?"))}, Envoy {esc(envoy_version(meta["envoy"]))}, '
           f'{meta["rounds"]} rounds of {meta["duration_s"]} s, medians</text>']

    def panel(x0, title, ylabel, value, scale, ticks, budget_marks, fmt):
        out.append(f'<text x="{x0 + panel_w / 2}" y="{top - 14}" text-anchor="middle" font-size="13" '
                   f'font-weight="bold">{esc(title)}</text>')
        out.append(f'<text transform="translate({x0 - 70},{top + panel_h / 2}) rotate(-90)" '
                   f'text-anchor="middle" fill="#555">{esc(ylabel)}</text>')
        for tv in ticks:
            y = top + panel_h - scale(tv) * panel_h
            out.append(f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + panel_w}" y2="{y:.1f}" stroke="#e5e5e5"/>')
            out.append(f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#555">{esc(fmt(tv))}</text>')
        out.append(f'<line x1="{x0}" y1="{top + panel_h}" x2="{x0 + panel_w}" y2="{top + panel_h}" stroke="#333"/>')
        group = panel_w / max(1, len(sizes))
        bar = min(30, (group - 16) / max(1, len(series)))
        for i, size in enumerate(sizes):
            gx = x0 + i * group + (group - bar * len(series)) / 2
            out.append(f'<text x="{x0 + i * group + group / 2}" y="{top + panel_h + 18}" '
                       f'text-anchor="middle">{esc(size_text(size))}</text>')
            mark = budget_marks.get(size)
            if mark is not None:
                y = top + panel_h - scale(mark) * panel_h
                out.append(f'<line x1="{x0 + i * group + 6}" y1="{y:.1f}" x2="{x0 + (i + 1) * group - 6}" '
                           f'y2="{y:.1f}" stroke="#2f6b2a" stroke-width="1.5" stroke-dasharray="6,3">'
                           f'<title>the native build\'s budget: {esc(fmt(mark))}</title></line>')
            for j, t in enumerate(series):
                v = value(size, t)
                if v is None:
                    continue
                h = max(0.0, min(1.0, scale(v))) * panel_h
                x = gx + j * bar
                out.append(f'<rect x="{x:.1f}" y="{top + panel_h - h:.1f}" width="{bar - 2:.1f}" height="{h:.1f}" '
                           f'fill="{COLORS.get(t, "#999")}"><title>{esc(label(t))} {esc(size)}: {esc(fmt(v))}</title></rect>')
                out.append(f'<text x="{x + (bar - 2) / 2:.1f}" y="{top + panel_h - h - 4:.1f}" text-anchor="middle" '
                           f'font-size="9" fill="#333">{esc(fmt(v))}</text>')

    def tput(size, t):
        d = by_id[f"{size}/throughput"]["vs_plain"].get(t)
        return d and d["ratio"]

    def cpu(size, t):
        d = by_id.get(f"{size}/cpu", {}).get("vs_plain", {}).get(t)
        return d and d["added"]

    panel(lefts[0], "Throughput, 32 connections, × plain Envoy", "× plain Envoy (higher is better)",
          tput, lambda v: v / 1.2, [0, 0.25, 0.5, 0.75, 1.0], {"1KB": 0.85, "64KB": 0.75},
          times)
    lo, hi = 1.0, 100000.0

    def log_scale(v):
        return (math.log10(max(v, lo)) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))

    panel(lefts[1], "Added CPU per request over plain Envoy", "µs, log scale (lower is better)",
          cpu, log_scale, [1, 10, 100, 1000, 10000, 100000], {"1KB": 10},
          lambda v: f"{v:.0f} µs" if abs(v) < 1000 else f"{v / 1000:.1f} ms")
    # Legend.
    x = 70
    y = H - 30
    for t in series:
        out.append(f'<rect x="{x}" y="{y - 10}" width="12" height="12" fill="{COLORS.get(t, "#999")}"/>')
        out.append(f'<text x="{x + 16}" y="{y}">{esc(label(t))}</text>')
        x += 30 + 7 * len(label(t))
    out.append(f'<line x1="{x}" y1="{y - 4}" x2="{x + 24}" y2="{y - 4}" stroke="#2f6b2a" stroke-width="1.5" '
               'stroke-dasharray="6,3"/>')
    out.append(f'<text x="{x + 30}" y="{y}">the native build\'s budget</text>')
    out.append(f'<text x="{W - 10}" y="{H - 10}" text-anchor="end" font-size="10" fill="#777">'
               'CPU: the Envoy process (AI Gateway: Envoy and its ext_proc server; LiteLLM: its process); '
               'scripts/bench.sh</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw")
    p.add_argument("--meta")
    p.add_argument("--out")
    p.add_argument("--results")
    p.add_argument("--svg")
    a = p.parse_args()
    if a.results:
        if not a.svg:
            sys.exit("--results needs --svg")
        chart(json.load(open(a.results)), a.svg)
        return
    if not (a.raw and a.meta and a.out):
        sys.exit("needs --raw, --meta and --out (or --results with --svg)")
    rows = [json.loads(line) for line in open(a.raw)]
    meta = json.load(open(a.meta))
    cases, memory, errors = summarize(rows, meta)
    builds, budget_rows = budgets(cases, memory, meta)
    main_table, budget_table = tables(cases, memory, meta, builds, budget_rows)
    short = summary(cases, meta)
    print(main_table)
    print()
    print(budget_table)
    print()
    print(short)
    print()
    for c in cases:
        for t, us in c.get("side_cpu_us", {}).items():
            if meta["targets"][t] != "aigw":
                print(f"{c['case']}, {label(t)}: plus {us:.0f} µs in the rate limit service and Redis")
    print(f"{meta['date']}, {meta['nproc']} cores ({meta['cpu']}), load {meta.get('load')}, Envoy {meta['envoy']}, "
          f"{meta['rounds']} rounds of {meta['duration_s']} s, {meta['streaming_runs']} streaming runs, "
          f"{meta['cores']}; git {meta['git']}")
    for n in meta.get("notes", []):
        print(n)
    for t in meta.get("unverified", []):
        print(f"{label(t)} did not rewrite the request in the check: its numbers are not the filter's cost")
    if errors:
        print("\nERRORS (non-2xx or socket errors; the numbers above are suspect):")
        for e in errors:
            print("  " + e)
    results = {"meta": meta, "cases": cases, "memory": memory,
               "budgets": [{"budget": text, "builds": {t: {"measured": m, "verdict": v} for t, (m, v) in cells.items()}}
                           for text, cells in budget_rows],
               "errors": errors, "table": main_table, "budget_table": budget_table, "summary_table": short}
    with open(a.out, "w") as f:
        json.dump(results, f, indent=2, ensure_ascii=False)
    if a.svg:
        chart(results, a.svg)


if __name__ == "__main__":
    main()
