"""report.html's plots: matplotlib figures as inline SVG that read under Jenkins' CSP.

Jenkins serves archived files with `sandbox; default-src 'none'; img-src 'self';
style-src 'self';`: inline <style> and style="" are blocked, SVG presentation attributes
are not. matplotlib writes both (a <style> rule for line joins, style="" on every
element), so each figure's SVG is rewritten: declarations become attributes, the <style>
rule goes onto the root <svg> (inherited the way its `*` selector applied). Element ids
are prefixed per figure, since several SVGs share one HTML document and matplotlib's
clip-path ids repeat across figures of the same layout. Deterministic (svg.hashsalt, no
date), so a re-render of the same results.json gives the same bytes.
"""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402

from kpatchtest.compare.model import MetricComparison  # noqa: E402
from kpatchtest.report.workload_cells import median  # noqa: E402

SVG_NS = "http://www.w3.org/2000/svg"
XLINK_NS = "http://www.w3.org/1999/xlink"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", XLINK_NS)

RC = {"svg.fonttype": "none", "svg.hashsalt": "kpatchtest", "font.size": 9,
      "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans", "Liberation Sans", "Arial"]}

# apply status -> (colour, label); the HTML table's classes use the same colours (report.css)
STATUS_COLOURS = {
    "applied": ("#8fd19e", "applied"),
    "applied-3way": ("#ffe08a", "3-way / fuzz"),
    "already-present": ("#9ec5fe", "already present"),
    "conflict": ("#f1948a", "conflict"),
    "skipped": ("#d5d8dc", "skipped"),
}
BUILD_COLOURS = {"baseline": "#4c72b0", "patched": "#dd8452"}
VERDICT_COLOURS = {"slower": "#c0392b", "more": "#c0392b", "faster": "#1e8449", "less": "#1e8449"}


def _to_attributes(el: ET.Element) -> None:
    style = el.attrib.pop("style", None)
    if not style:
        return
    for decl in style.split(";"):
        if ":" in decl:
            key, value = (x.strip() for x in decl.split(":", 1))
            el.set(key, value)


def svg_text(fig, prefix: str) -> str:
    """The figure as an <svg> element for inline use: no style= attributes, no <style>."""
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None}, bbox_inches="tight")
    plt.close(fig)
    root = ET.fromstring(buf.getvalue())
    for parent in list(root.iter()):
        for child in list(parent):
            tag = child.tag.rsplit("}", 1)[-1]
            if tag == "metadata":
                parent.remove(child)
            elif tag == "style":
                for rule in re.findall(r"\{([^}]*)\}", child.text or ""):
                    for decl in rule.split(";"):
                        if ":" in decl:
                            key, value = (x.strip() for x in decl.split(":", 1))
                            root.set(key, value)
                parent.remove(child)
    href = f"{{{XLINK_NS}}}href"
    for el in root.iter():
        _to_attributes(el)
        if "id" in el.attrib:
            el.set("id", f"{prefix}-{el.get('id')}")
        if el.get(href, "").startswith("#"):
            el.set(href, f"#{prefix}-{el.get(href)[1:]}")
        for key, value in list(el.attrib.items()):
            if "url(#" in value:
                el.set(key, value.replace("url(#", f"url(#{prefix}-"))
    root.set("role", "img")
    return ET.tostring(root, encoding="unicode")


def heatmap(patches: list[tuple[int, str]], branches: list[str], status: list[list[str | None]],
            labels: list[list[str]]) -> str:
    """Patch x branch, coloured by apply status; a cell's text is the matrix's."""
    names = list(STATUS_COLOURS)
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(1.6 + 1.9 * len(branches), 0.6 + 0.42 * len(patches)))
        # rectangles, not imshow: its raster is a data: URI image, which img-src 'self' blocks
        for i, row in enumerate(status):
            for j, s in enumerate(row):
                ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, facecolor=STATUS_COLOURS[s][0] if s else "#ffffff",
                                       edgecolor="white", linewidth=2))
        ax.set_xlim(-0.5, len(branches) - 0.5)
        ax.set_ylim(len(patches) - 0.5, -0.5)
        for i, row in enumerate(labels):
            for j, text in enumerate(row):
                ax.text(j, i, text if len(text) <= 24 else text[:22] + "...", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(branches)), branches)
        ax.set_yticks(range(len(patches)), [f"{i} {s[:40]}" for i, s in patches], fontsize=7)
        ax.xaxis.tick_top()
        for side in ax.spines.values():
            side.set_visible(False)
        used = sorted({s for row in status for s in row if s}, key=names.index)
        ax.legend(handles=[Patch(color=STATUS_COLOURS[s][0], label=STATUS_COLOURS[s][1])
                           for s in used], loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=7, frameon=False)
        return svg_text(fig, "heat")


def strip(title: str, unit: str, groups: list[tuple[str, dict[str, list[float]]]], prefix: str) -> str:
    """Baseline and patched values side by side per group (a branch on a host): every
    repetition of every round a point, jittered deterministically, the median a bar."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(groups), 2.6))
        ticks, names = [], []
        for g, (label, sides) in enumerate(groups):
            for k, build in enumerate(("baseline", "patched")):
                values = sides.get(build, [])
                x0 = g * 3 + k
                xs = [x0 + (((i * 0.618) % 1) - 0.5) * 0.5 for i in range(len(values))]
                ax.scatter(xs, values, s=12, color=BUILD_COLOURS[build], alpha=0.7,
                           label=build if g == 0 else None, linewidths=0)
                if values:
                    ax.hlines(median(values), x0 - 0.35, x0 + 0.35, color="#222222", linewidth=1.2)
            ticks.append(g * 3 + 0.5)
            names.append(label)
        ax.set_xticks(ticks, names, fontsize=7)
        ax.set_xlim(-0.8, len(groups) * 3 - 1.2)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, frameon=False, loc="best")
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
        return svg_text(fig, prefix)


def forest(rows: list[tuple[str, MetricComparison]], threshold: float) -> str:
    """Ratio patched/baseline with its 95% CI per metric, the 1 +- threshold band shaded."""
    with plt.rc_context(RC):
        fig, ax = plt.subplots(figsize=(7.5, 0.8 + 0.32 * len(rows)))
        ax.axvspan(1 - threshold, 1 + threshold, color="#d6eaf8", label=f"+-{threshold * 100:g}%")
        ax.axvline(1, color="#555555", linewidth=0.8)
        for y, (_, m) in enumerate(rows):
            colour = VERDICT_COLOURS.get(m.verdict, "#333333")
            if m.ci_low is not None and m.ci_high is not None:
                ax.hlines(y, m.ci_low, m.ci_high, color=colour, linewidth=2)
            ax.plot([m.ratio], [y], "o", color=colour, markersize=4)
        ax.set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=7)
        ax.invert_yaxis()
        ends = [x for _, m in rows for x in (m.ratio, m.ci_low, m.ci_high) if x is not None and x > 0]
        if ends and (max(ends) > 2 or min(ends) < 0.5):
            ax.set_xscale("log")        # ratios are multiplicative: x1.1 and x270 on one axis

        ax.set_xlabel("ratio patched / baseline (median), 95% CI")
        ax.legend(fontsize=7, frameon=False, loc="lower right")
        ax.grid(axis="x", color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
        return svg_text(fig, "forest")
