"""The evaluation report: ``results.json``, ``index.html`` (a page that needs no network) and
``summary.md`` (the summary table in Markdown).

Pictures are PNG files next to the page (relative links): per image the photo with its
ground-truth boxes (green) and one overlay per method with the ground truth and the method's
weakly supervised box (white). The page holds the summary table (mean and bootstrap 95 %
interval per method and metric), the deletion/insertion curves (mean over images) as an
inline SVG, the sanity-check cascade, the cost per metric, and the gallery. A small script
writes how many images loaded into ``#load-status`` (for headless checks).
"""

from __future__ import annotations

import html
import json
import math

import cv2
import numpy as np

from ..visualize import encode_png, overlay
from .run import SUMMARY, Evaluation

GREEN = (40, 220, 40)
WHITE = (255, 255, 255)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def _draw(image: np.ndarray, boxes, colour, thickness: int) -> np.ndarray:
    out = np.ascontiguousarray(image)
    for box in boxes:
        if box is None:
            continue
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        cv2.rectangle(out, (x1, y1), (max(x1, x2 - 1), max(y1, y2 - 1)), colour, thickness)
    return out


def _thumbnail(image: np.ndarray, width: int = 320) -> tuple[np.ndarray, float]:
    scale = min(1.0, width / image.shape[1])
    if scale == 1.0:
        return image.copy(), 1.0
    size = (int(round(image.shape[1] * scale)), int(round(image.shape[0] * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def _scaled(boxes, scale: float):
    return [None if b is None else [v * scale for v in b] for b in boxes]


def render_files(evaluation: Evaluation) -> dict[str, bytes]:
    """Every output file by name: results.json, index.html and the PNGs it links."""
    results = evaluation.results
    files: dict[str, bytes] = {}
    for n, record in enumerate(results["images"]):
        picture = np.clip(evaluation.pictures[n], 0, 255).astype(np.uint8)
        small, scale = _thumbnail(picture)
        thickness = max(1, int(round(small.shape[1] / 160)))
        stem = f"img{n:03d}"
        record["picture"] = f"{stem}.png"
        files[record["picture"]] = encode_png(_draw(small, _scaled(record["boxes"], scale), GREEN, thickness))
        for method, entry in record["methods"].items():
            blended = _thumbnail(overlay(picture, evaluation.maps[method][n]))[0]
            blended = _draw(blended, _scaled(record["boxes"], scale), GREEN, thickness)
            blended = _draw(blended, _scaled([entry.get("box")], scale), WHITE, thickness)
            entry["overlay"] = f"{stem}.{method}.png"
            files[entry["overlay"]] = encode_png(blended)
    files["results.json"] = json.dumps(_clean(results), indent=1).encode()
    files["index.html"] = render_html(results).encode()
    files["summary.md"] = summary_markdown(results).encode()
    return files


def summary_markdown(results: dict) -> str:
    """The summary table as Markdown (mean and 95 % interval per method and metric), for READMEs."""
    summary = results["summary"]
    names = [k for k in SUMMARY if any(k in summary[m] for m in summary)]
    sanity = any("sanity_changed_at" in summary[m] for m in summary)
    head = ["method"] + [SUMMARY[k][1] + (" %" if SUMMARY[k][3] else "") + (" ↑" if SUMMARY[k][2] == "higher" else " ↓")
                         for k in names] + (["sanity: changed at / stops changing at"] if sanity else [])
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for method, metrics in summary.items():
        cells = [method]
        for k in names:
            item, percent = metrics.get(k), SUMMARY[k][3]
            cells.append(f"{_number(item['mean'], percent)} [{_number(item['low'], percent)}, "
                         f"{_number(item['high'], percent)}]" if item else "–")
        if sanity:
            cells.append(f"{metrics.get('sanity_changed_at') or 'never'} / {metrics.get('sanity_stops_changing_at') or '–'}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _clean(value):
    """JSON without NaN (null instead), numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    return value


def _number(value, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _summary_table(results: dict) -> str:
    summary = results["summary"]
    names = [k for k in SUMMARY if any(k in summary[m] for m in summary)]
    head = "".join(f"<th>{html.escape(SUMMARY[k][1])}{' %' if SUMMARY[k][3] else ''}"
                   f"<br><small>{'↑' if SUMMARY[k][2] == 'higher' else '↓'}</small></th>" for k in names)
    extra = any("sanity_changed_at" in summary[m] for m in summary)
    if extra:
        head += "<th>Sanity: changed at<br><small>layers randomized</small></th><th>Sanity: stops changing at</th>"
    rows = []
    for method, metrics in summary.items():
        cells = []
        for k in names:
            item = metrics.get(k)
            if not item:
                cells.append("<td>–</td>")
                continue
            percent = SUMMARY[k][3]
            cells.append(f"<td>{_number(item['mean'], percent)}<br><small>[{_number(item['low'], percent)}, "
                         f"{_number(item['high'], percent)}]</small></td>")
        if extra:
            cells += [f"<td>{metrics.get('sanity_changed_at') or 'never'}</td>",
                      f"<td>{metrics.get('sanity_stops_changing_at') or '–'}</td>"]
        rows.append(f"<tr><th>{html.escape(method)}</th>{''.join(cells)}</tr>")
    return (f'<table id="summary"><thead><tr><th>method</th>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table>")


def _curves_svg(results: dict) -> str:
    """Mean deletion (solid) and insertion (dashed) curves per method."""
    width, height, pad = 560, 300, 40
    lines, legend = [], []
    for index, method in enumerate(results["methods"]):
        curves = [r["methods"][method].get("curves") for r in results["images"]]
        curves = [c for c in curves if c]
        if not curves:
            continue
        colour = PALETTE[index % len(PALETTE)]
        fractions = np.array(curves[0]["fractions"])
        for kind, dash in (("deletion", ""), ("insertion", ' stroke-dasharray="6 4"')):
            mean = np.mean([c[kind] for c in curves], axis=0)
            points = " ".join(f"{pad + f * (width - 2 * pad):.1f},{height - pad - s * (height - 2 * pad):.1f}"
                              for f, s in zip(fractions, mean))
            lines.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="{points}"/>')
        legend.append(f'<text x="{width - pad - 150}" y="{pad + 16 * index}" fill="{colour}" '
                      f'font-size="12">{html.escape(method)}</text>')
    if not lines:
        return ""
    axes = (f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#444"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#444"/>'
            f'<text x="{width / 2}" y="{height - 8}" font-size="12" text-anchor="middle">fraction of pixels '
            f'deleted (solid) / inserted (dashed)</text>'
            f'<text x="12" y="{height / 2}" font-size="12" transform="rotate(-90 12 {height / 2})" '
            f'text-anchor="middle">{html.escape(results["config"]["score"])}</text>'
            + "".join(f'<text x="{pad + t * (width - 2 * pad)}" y="{height - pad + 14}" font-size="10" '
                      f'text-anchor="middle">{t:g}</text>' for t in (0, 0.25, 0.5, 0.75, 1))
            + "".join(f'<text x="{pad - 4}" y="{height - pad - t * (height - 2 * pad) + 3}" font-size="10" '
                      f'text-anchor="end">{t:g}</text>' for t in (0, 0.5, 1)))
    return (f'<svg id="curves" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}">{axes}{"".join(lines)}{"".join(legend)}</svg>')


def _sanity_table(results: dict) -> str:
    sanity = results.get("sanity")
    if not sanity:
        return ""
    first = next(iter(sanity.values()))
    head = "".join(f"<th>{s['randomized']}<br><small>{html.escape(s['down_to'])}</small></th>" for s in first["steps"])
    rows = "".join(
        f"<tr><th>{html.escape(m)}</th>" + "".join(
            f"<td>{rho:.2f} / {sim:.2f}</td>" for rho, sim in zip(v["mean_spearman"], v["mean_ssim"])) + "</tr>"
        for m, v in sanity.items())
    return (f"<h2>Sanity check: cascading randomization</h2><p>Mean rank correlation / SSIM with the "
            f"original maps after randomizing the top k of {first['layers']} weighted layers (down to the "
            f"named node). Faithful maps change (low values).</p>"
            f'<table id="sanity"><thead><tr><th>method \\ k</th>{head}</tr></thead><tbody>{rows}</tbody></table>')


def _cost_table(results: dict) -> str:
    cost = results["cost_per_image_and_method"]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{v['seconds']:.3f}</td><td>{v['passes']:.0f}</td></tr>"
                   for k, v in cost.items())
    return ("<h2>Cost</h2><p>Per image and method (sanity: per image, all methods; explain: per image, "
            "all methods).</p><table id=\"cost\"><thead><tr><th>metric</th><th>seconds</th>"
            f"<th>forward passes</th></tr></thead><tbody>{rows}</tbody></table>")


def _gallery(results: dict) -> str:
    cards = []
    for record in results["images"]:
        name = html.escape(record["file"].rsplit("/", 1)[-1])
        label = html.escape(record["label"] or str(record["target"]))
        figures = [f'<figure><img src="{html.escape(record["picture"])}" alt="{name}">'
                   f"<figcaption>{name}<br>explained: {label} (p={record['probability']:.2f})<br>"
                   f"objects: {html.escape(', '.join(record['objects']))}</figcaption></figure>"]
        for method, entry in record["methods"].items():
            shown = ", ".join(f"{k}={_number(v)}" for k, v in entry["metrics"].items()
                              if k in SUMMARY or k.startswith("road"))
            figures.append(f'<figure><img src="{html.escape(entry["overlay"])}" alt="{html.escape(method)}">'
                           f"<figcaption><b>{html.escape(method)}</b><br><small>{html.escape(shown)}</small>"
                           "</figcaption></figure>")
        cards.append(f'<div class="row">{"".join(figures)}</div>')
    return "".join(cards)


STYLE = """body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:center;font-size:13px}small{color:#666}
.row{display:flex;flex-wrap:wrap;gap:8px;margin-bottom:16px;border-bottom:1px solid #eee}
figure{margin:0;max-width:330px}figure img{max-width:320px;display:block}figcaption{font-size:12px}"""

SCRIPT = """window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;
  var status = document.getElementById('load-status');
  status.setAttribute('data-loaded', loaded);
  status.setAttribute('data-total', images.length);
  status.setAttribute('data-rows', document.querySelectorAll('#summary tbody tr').length);
  status.textContent = loaded + ' of ' + images.length + ' images loaded';
});"""


def render_html(results: dict) -> str:
    config = results["config"]
    settings = (f"threshold {config['threshold']} of the max; pointing tolerance {config['tolerance']} px; "
                f"score: {config['score']}; deletion baseline {config['deletion_baseline']}, insertion "
                f"baseline {config['insertion_baseline']}, {config['steps']} steps; occlusion "
                f"{config['occlusion_patch']} px windows, stride {config['occlusion_stride']}; "
                f"{config['resamples']} bootstrap resamples")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>onnxcam evaluation</title><style>{STYLE}</style></head>
<body><h1>onnxcam evaluation</h1>
<p>model <code>{html.escape(results['model'])}</code>, layer <code>{html.escape(results['layer'])}</code>,
{len(results['images'])} images, provider {html.escape(results['provider'])}.<br><small>{html.escape(settings)}</small></p>
<p id="load-status" data-loaded="0" data-total="0" data-rows="0">images not loaded yet</p>
<h2>Summary</h2><p>Mean over images with its bootstrap 95 % interval; ↑ higher is better, ↓ lower is better.</p>
{_summary_table(results)}
<h2>Deletion and insertion</h2>{_curves_svg(results)}
{_sanity_table(results)}
{_cost_table(results)}
<h2>Gallery</h2><p>Green: ground truth; white: the method's box (largest segment above the threshold).</p>
{_gallery(results)}
<script>{SCRIPT}</script></body></html>
"""
