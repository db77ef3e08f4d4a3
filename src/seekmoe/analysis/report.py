"""The HTML report of `seekmoe analyze`: one self-contained file (inline CSS, heatmaps as coloured tables, charts as
inline SVG, no script and nothing fetched), rendered from the results dict that is also written as JSON. Every
number sits next to its definition."""

from __future__ import annotations

import html

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { margin-top: 2em; border-bottom: 1px solid #ccc; } h3 { font-size: 1.05em; }
table { border-collapse: collapse; margin: .5em 0; } td, th { padding: 2px 6px; border: 1px solid #ddd; }
th { background: #f4f4f4; text-align: left; } td.n { text-align: right; font-variant-numeric: tabular-nums; }
table.heat td { width: 14px; height: 16px; padding: 0; border: 1px solid #fff; font-size: 9px; text-align: center; }
table.heat th { font-weight: normal; font-size: 11px; white-space: nowrap; }
dl.defs { font-size: 12.5px; color: #444; background: #fafafa; border-left: 3px solid #bbb; padding: .4em .8em; }
dl.defs dt { font-weight: 600; } dl.defs dd { margin: 0 0 .3em 1em; }
.tok { white-space: pre-wrap; border-radius: 2px; padding: 0 1px; }
.prompt { font-family: ui-monospace, monospace; line-height: 1.9; margin: .3em 0 1em; }
code, .mono { font-family: ui-monospace, monospace; }
"""
MAX_MATRIX_EXPERTS = 64  # above this many experts the E x E co-activation heatmaps stay in the JSON only


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def _visible(text: str) -> str:
    """A token's text with its whitespace made visible."""
    return text.replace(" ", "\u2423").replace("\n", "\u23ce").replace("\t", "\u21e5") or "\u2205"


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}f}"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _defs(definitions: dict, keys: list[str]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(definitions[k])}</dd>" for k in keys if k in definitions)
    return f'<dl class="defs">{items}</dl>'


def _sequential(value: float, vmax: float) -> str:
    """White to dark blue as value goes 0 -> vmax."""
    t = max(0.0, min(1.0, value / vmax if vmax > 0 else 0.0))
    r, g, b = (int(255 - t * (255 - c)) for c in (8, 48, 107))
    return f"rgb({r},{g},{b})"


def _diverging(value: float, centre: float = 1.0, span: float = 1.0) -> str:
    """Blue below `centre`, white at it, red above, saturating at centre +- span."""
    t = max(-1.0, min(1.0, (value - centre) / span))
    if t >= 0:
        return f"rgb(255,{int(255 - 200 * t)},{int(255 - 200 * t)})"
    return f"rgb({int(255 + 200 * t)},{int(255 + 200 * t)},255)"


def expert_colour(expert: int, n_experts: int) -> str:
    """A light colour per expert, hues spread around the wheel (neighbouring ids far apart)."""
    hue = (expert * 137.508) % 360 if n_experts > 12 else 360 * expert / max(n_experts, 1)
    return f"hsl({hue:.0f},75%,78%)"


def _heatmap(rows: list[tuple[str, list[float]]], colour, title) -> str:
    """A table of coloured cells, one row per (label, values); `title(row, col, value)` is each cell's hover text."""
    if not rows:
        return ""
    n = len(rows[0][1])
    head = "<tr><th></th>" + "".join(f"<th>{j}</th>" if n <= 64 or j % 8 == 0 else "<th></th>" for j in range(n))
    body = []
    for i, (label, values) in enumerate(rows):
        cells = "".join(f'<td style="background:{colour(v)}" title="{_e(title(i, j, v))}"></td>'
                        for j, v in enumerate(values))
        body.append(f"<tr><th>{_e(label)}</th>{cells}</tr>")
    return f'<table class="heat">{head}</tr>{"".join(body)}</table>'


def _bars(labels: list[str], values: list[float], reference: float | None = None, width: int = 640,
          unit: str = "") -> str:
    """A horizontal bar chart as inline SVG; `reference` draws a dashed line (the baseline)."""
    if not values:
        return ""
    row, left, right = 22, 190, 70
    hi = max(values + ([reference] if reference is not None else []))
    lo = min(values + ([reference] if reference is not None else []))
    lo = max(0.0, lo - 0.1 * (hi - lo + 1e-9)) if lo > 0 else lo
    scale = (width - left - right) / max(hi - lo, 1e-9)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{row * len(values) + 24}" '
             f'font-size="12" font-family="system-ui,sans-serif">']
    for i, (label, v) in enumerate(zip(labels, values)):
        y = 4 + i * row
        w = max(1.0, (v - lo) * scale)
        parts.append(f'<text x="{left - 6}" y="{y + 14}" text-anchor="end">{_e(label)}</text>'
                     f'<rect x="{left}" y="{y + 2}" width="{w:.1f}" height="{row - 6}" fill="#4c78a8">'
                     f'<title>{_e(label)}: {v:.4f}{unit}</title></rect>'
                     f'<text x="{left + w + 4:.1f}" y="{y + 14}">{v:.4f}</text>')
    if reference is not None:
        x = left + (reference - lo) * scale
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{row * len(values) + 4}" stroke="#c00" '
                     f'stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{left}" y="{row * len(values) + 20}" fill="#666">axis from {lo:.3f}'
                 f'{"; dashed: as trained" if reference is not None else ""}</text></svg>')
    return "".join(parts)


def _summary(results: dict) -> str:
    d = results["definitions"]
    rows = ["<tr><th>layer</th><th>tokens</th><th>MaxVio</th><th>routing entropy (nats)</th><th>load entropy</th>"
            "<th>dropped share</th><th>shared norm share</th><th>consecutive top-1 same (random)</th>"
            "<th>consecutive top-k overlap (random)</th><th>token concentration (random)</th></tr>"]
    for s, v in zip(results["layers"], results["vocabulary"]):
        c = s["consecutive"]
        # a hash-routed layer (DeepSeek-V4's first layers) is marked: its experts follow a fixed token table
        layer = f"{s['layer']} (hash)" if s.get("routing") == "hash" else str(s["layer"])
        rows.append(f"<tr><td>{layer}</td><td class=n>{s['tokens']}</td><td class=n>{_fmt(s['max_vio'])}</td>"
                    f"<td class=n>{_fmt(s['routing_entropy'])} / ln E = {_fmt(s['routing_entropy_max'])}</td>"
                    f"<td class=n>{_fmt(s['load_entropy'])}</td><td class=n>{_pct(s['dropped_share'])}</td>"
                    f"<td class=n>{_pct(s['shared_norm_share'])}</td>"
                    f"<td class=n>{_pct(c['top1_same'])} ({_pct(c['top1_random'])})</td>"
                    f"<td class=n>{_pct(c['topk_overlap'])} ({_pct(c['topk_random'])})</td>"
                    f"<td class=n>{_pct(v['concentration_mean'])} ({_pct(v['concentration_random'])})</td></tr>")
    return (f"<table>{''.join(rows)}</table>"
            + _defs(d, ["max_vio", "routing_entropy", "load_entropy", "dropped_share", "shared_norm_share",
                        "consecutive_top1", "consecutive_overlap", "token_concentration"]))


def _load(results: dict) -> str:
    E = results["model"]["n_routed_experts"]
    rows = [(f"layer {s['layer']}", [x * E for x in s["load"]]) for s in results["layers"]]
    heat = _heatmap(rows, lambda v: _sequential(v, 2.0),
                    lambda i, j, v: f"layer {results['layers'][i]['layer']}, expert {j}: load "
                                    f"{_pct(v / E)} = {v:.2f} x 1/E ({results['layers'][i]['counts'][j]} tokens)")
    norms = "".join(f"<tr><td>{s['layer']}</td><td class=n>{_fmt(s['shared_norm_mean'])}</td>"
                    f"<td class=n>{_fmt(s['routed_norm_mean'])}</td>"
                    f"<td class=n>{_pct(s['shared_norm_share'])}</td></tr>" for s in results["layers"])
    return (f"<p>Cell colour: load relative to the balanced share 1/E (white 0, dark blue 2x or more); hover for "
            f"the numbers.</p>{heat}{_defs(results['definitions'], ['load'])}"
            f"<h3>Shared and routed experts' output norms</h3><table><tr><th>layer</th><th>mean ||shared||</th>"
            f"<th>mean ||routed||</th><th>shared share</th></tr>{norms}</table>"
            + _defs(results["definitions"], ["shared_norm_share"]))


def _domain(results: dict) -> str:
    names = [s["name"] for s in results["sources"]]
    if len(names) < 2:
        note = "<p>Give two or more <code>--data</code> sources to compare their routing.</p>"
    else:
        note = ""
    parts = [note, "<p>Cell colour: share<sub>d,i</sub> / (k/E), blue below 1, white 1, red above (saturating at 0 "
             "and 2); hover for the numbers.</p>"]
    tv = ["<tr><th>layer</th>" + "".join(f"<th>{_e(n)}: TV from uniform</th><th>{_e(n)}: TV from pooled</th>"
                                         for n in names) + "</tr>"]
    for dom in results["domain"]:
        parts.append(f"<h3>layer {dom['layer']}</h3>")
        parts.append(_heatmap([(n, r) for n, r in zip(names, dom["ratio"])], _diverging,
                              lambda i, j, v, dom=dom: f"{names[i]}, expert {j}: {_pct(dom['share'][i][j])} of "
                                                       f"its tokens, {v:.2f} x uniform"))
        tv.append(f"<tr><td>{dom['layer']}</td>" + "".join(
            f"<td class=n>{_fmt(a)}</td><td class=n>{_fmt(b)}</td>" for a, b in zip(dom["tv_uniform"],
                                                                                     dom["tv_pooled"])) + "</tr>")
    parts.append(f"<h3>Distance of each source's load from uniform and from the pooled load</h3>"
                 f"<table>{''.join(tv)}</table>")
    return "".join(parts) + _defs(results["definitions"], ["domain_share", "domain_ratio", "domain_tv_uniform",
                                                           "domain_tv_pooled"])


def _modality(results: dict) -> str:
    m = results.get("modality")
    if not m:
        return ("<p>No image tokens in the data. Give <code>--modality-token-id ID</code> (or a model whose "
                "<code>media_placeholder_token_id</code> occurs in the data) to split the routing into image and "
                "text tokens.</p>")
    E = results["model"]["n_routed_experts"]
    groups = m.get("expert_groups")
    split = (f"modality-aware routing: image groups {groups['image']}, text groups {groups['text']}" if groups
             else "one routing shared by both modalities")
    rows = ["<tr><th>layer</th><th>image tokens</th><th>text tokens</th><th>JS divergence (bits)</th>"
            "<th>MaxVio image</th><th>MaxVio text</th><th>shared share image</th><th>shared share text</th>"
            "<th>image-only experts</th><th>text-only experts</th></tr>"]
    parts = []
    for layer in m["layers"]:
        t, v, sh, sp = layer["tokens"], layer["max_vio"], layer["shared_norm_share"], layer["specialized_experts"]
        rows.append(f"<tr><td>{layer['layer']}</td><td class=n>{t['image']}</td><td class=n>{t['text']}</td>"
                    f"<td class=n>{_fmt(layer['js_divergence'])}</td><td class=n>{_fmt(v['image'])}</td>"
                    f"<td class=n>{_fmt(v['text'])}</td><td class=n>{_pct(sh['image'])}</td>"
                    f"<td class=n>{_pct(sh['text'])}</td><td class=n>{sp['image']}</td>"
                    f"<td class=n>{sp['text']}</td></tr>")
        load = [(f"{name} load", [x * E for x in layer["load"][name]]) for name in ("image", "text")]
        parts.append(f"<h3>layer {layer['layer']}</h3>" + _heatmap(
            load, lambda x: _sequential(x, 2.0),
            lambda i, j, x: f"expert {j}: {_pct(x / E)} of the {('image', 'text')[i]} tokens' "
                                                    f"slots = {x:.2f} x 1/E"))
        parts.append(_heatmap([("specialization", layer["specialization"])], lambda x: _diverging(x, 0.0, 1.0),
                              lambda i, j, x: f"expert {j}: specialization {x:+.2f} (+1 image only, -1 text only)"))
    return (f"<p>Image token id {m['image_token_id']} (from {_e(m['token_id_from'])}): {m['tokens']['image']} image "
            f"and {m['tokens']['text']} text tokens; {_e(split)}. Mean JS divergence of the two loads over the "
            f"layers: <b>{_fmt(m['js_divergence_mean'])}</b> bits (0 alike, 1 disjoint experts).</p>"
            f"<table>{''.join(rows)}</table>"
            f"<p>Load rows: share of each modality's slots relative to 1/E (white 0, dark blue 2x or more). "
            f"Specialization row: red = image tokens' expert, blue = text tokens', white = shared alike.</p>"
            + "".join(parts)
            + _defs(results["definitions"], ["modality", "modality_load", "modality_specialization", "modality_js",
                                             "modality_max_vio", "modality_shared_share",
                                             "modality_specialized_experts"]))


def _vocabulary(results: dict) -> str:
    parts = []
    for v in results["vocabulary"]:
        rows = []
        for e, entries in enumerate(v["experts"]):
            cells = ", ".join(f'<span class="mono" title="id {t["token"]}: {t["count"]} times, '
                              f'{_pct(t["of_token"])} of this token\'s occurrences">{_e(_visible(t["text"]))}</span> '
                              f'{_pct(t["of_expert"])}' for t in entries)
            rows.append(f"<tr><td>{e}</td><td>{cells}</td></tr>")
        conc, spread = (", ".join(f'<span class="mono">{_e(_visible(t["text"]))}</span> {_pct(t["concentration"])} '
                                  f'(n={t["count"]})' for t in v[key])
                        for key in ("most_concentrated", "least_concentrated"))
        parts.append(f"<details{' open' if v is results['vocabulary'][0] else ''}><summary>layer {v['layer']}: "
                     f"mean token concentration {_pct(v['concentration_mean'])} (random "
                     f"{_pct(v['concentration_random'])}) over {v['tokens_counted']} token ids seen >= "
                     f"{v['min_count']} times</summary><table><tr><th>expert</th><th>tokens it receives most "
                     f"(share of the expert's tokens)</th></tr>{''.join(rows)}</table>"
                     f"<p>Most concentrated tokens: {conc or 'none seen often enough'}</p>"
                     f"<p>Least concentrated tokens: {spread or 'none seen often enough'}</p></details>")
    return "".join(parts) + _defs(results["definitions"], ["expert_top_tokens", "token_concentration"])


def _coactivation(results: dict) -> str:
    E = results["model"]["n_routed_experts"]
    parts = [] if E <= MAX_MATRIX_EXPERTS else [
        f"<p>With {E} experts the E x E matrices of P(j | i) are left to the JSON file (the page would hold "
        f"{E * E} cells a layer); the pairs chosen together most often are listed here.</p>"]
    for s in results["layers"]:
        co = s["coactivation"]
        pairs = ", ".join(f"({p['experts'][0]}, {p['experts'][1]}) {_pct(p['rate'])}" for p in co["top_pairs"])
        parts.append(f"<h3>layer {s['layer']}</h3><p>Pairs chosen together most often (rate; uniform random "
                     f"{_pct(co['random_pair_rate'])}): {pairs or 'none'}.</p>")
        if E <= MAX_MATRIX_EXPERTS:
            rows = [(f"i={i}", r) for i, r in enumerate(co["conditional"])]
            parts.append("<p>Cell (i, j): P(j | i), white 0 to dark blue 1.</p>" + _heatmap(
                rows, lambda v: _sequential(v, 1.0), lambda i, j, v: f"P(expert {j} | expert {i}) = {_pct(v)}"))
    return "".join(parts) + _defs(results["definitions"], ["coactivation"])


def _prompt(results: dict) -> str:
    p = results.get("prompt")
    if not p:
        return "<p>Pass <code>--prompt TEXT</code> to see each of its tokens' experts.</p>"
    E = results["model"]["n_routed_experts"]
    parts = ["<p>Each token's background is the colour of its highest-weight expert in that layer; hover for its "
             "experts and router weights.</p>"]
    for li, layer in enumerate(results["model"]["moe_layers"]):
        spans = []
        for t in p["tokens"]:
            r = t["layers"][li]
            tip = f"token {t['id']} {t['text']!r}, layer {layer}: " + ", ".join(
                f"expert {e} weight {w:.3f}" for e, w in zip(r["experts"], r["weights"]))
            spans.append(f'<span class="tok" style="background:{expert_colour(r["experts"][0], E)}" '
                         f'title="{_e(tip)}">{_e(t["text"])}</span>')
        parts.append(f"<h3>layer {layer}</h3><div class=\"prompt\">{''.join(spans)}</div>")
    legend = " ".join(f'<span class="tok mono" style="background:{expert_colour(e, E)}">{e}</span>'
                      for e in range(E))
    return "".join(parts) + f"<p>Experts: {legend}</p>"


def _saturation(results: dict) -> str:
    s = results.get("saturation")
    if not s:
        return "<p>Pass <code>--compare CHECKPOINT</code> (an earlier checkpoint of the same run) to measure it.</p>"
    rows = "".join(f"<tr><td>{layer}</td><td class=n>{_pct(v)}</td></tr>"
                   for layer, v in zip(results["model"]["moe_layers"], s["per_layer"]))
    return (f"<p>Compared checkpoint: <code>{_e(s['checkpoint'])}</code> (its loss {_fmt(s['loss'], 4)}, this "
            f"model's {_fmt(results['loss'], 4)}). Mean saturation {_pct(s['mean'])}.</p>"
            f"<table><tr><th>layer</th><th>saturation</th></tr>{rows}</table>"
            + _defs(results["definitions"], ["saturation"]))


def _probes(results: dict) -> str:
    p = results.get("probes")
    if not p:
        return "<p>Probes were not run (<code>--probe-tokens 0</code>).</p>"
    base = p["baseline"]
    labels, values = ["as trained"], [base]
    for r, loss in p.get("skip_top", {}).items():
        labels.append(f"top-{r} disabled")
        values.append(loss)
    if "no_shared" in p:
        labels.append("no shared experts")
        values.append(p["no_shared"])
    if "no_shared_plus_one" in p:
        labels.append("no shared, k+1 routed")
        values.append(p["no_shared_plus_one"])
    for kk, loss in p.get("top_k", {}).items():
        labels.append(f"k = {kk}{' (trained)' if int(kk) == p.get('top_k_trained') else ''}")
        values.append(loss)
    rows = "".join(f"<tr><td>{_e(label)}</td><td class=n>{_fmt(v, 4)}</td><td class=n>{v - base:+.4f}</td></tr>"
                   for label, v in zip(labels, values))
    note = f"<p>{_e(p['note'])}</p>" if "note" in p else ""
    return (f"{note}<p>Over {p['tokens']} tokens (the first sequences of each source).</p>"
            f"<table><tr><th>probe</th><th>loss</th><th>vs as trained</th></tr>{rows}</table>"
            + _bars(labels, values, reference=base)
            + _defs(results["definitions"], ["loss", "skip_top", "no_shared", "top_k"]))


def render_report(results: dict, title: str = "seekmoe routing analysis") -> str:
    """The report as one HTML document."""
    m = results["model"]
    sources = "".join(f"<li><code>{_e(s['name'])}</code>: {s['tokens']} tokens in {s['sequences']} sequences of "
                      f"{s['seq_len']}</li>" for s in results["sources"])
    sections = [("Per-layer summary", _summary), ("Expert load", _load), ("Domain specialization", _domain),
                ("Routing per modality", _modality), ("Vocabulary specialization", _vocabulary),
                ("Co-activation", _coactivation), ("Token-level view of the prompt", _prompt), ("Router saturation", _saturation),
                ("Ablation probes (DeepSeekMoE section 4.5)", _probes)]
    body = "".join(f"<h2>{_e(name)}</h2>{render(results)}" for name, render in sections)
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p>{m['n_routed_experts']} routed experts, {m['num_experts_per_tok']} active per token (k), "
            f"{m['n_shared_experts']} shared; router {_e(m['scoring_func'])} / {_e(m['topk_method'])}, "
            f"{m['n_group']} groups, {m['topk_group']} chosen; MoE layers {m['moe_layers']}.</p>"
            f"<p>Sources:</p><ul>{sources}</ul><p>Loss: <b>{_fmt(results['loss'], 4)}</b> nats.</p>"
            + _defs(results["definitions"], ["loss"]) + body
            + "<h2>All numbers</h2><p>The JSON file written beside this report holds every number shown here "
              "and the full co-activation, domain and load matrices.</p></body></html>")
