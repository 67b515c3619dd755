"""Grouped horizontal bar charts as plain SVG (no plotting library), for the bench scripts'
figures in docs/img/ (as `bench/autoscale_run.py` draws its chart).

    bars(path, title, unit, groups, series, values)

`groups` are the rows (e.g. "p50", "p99"), `series` the bars within a row (e.g. the proxies),
`values[g][s]` the figure of series s in group g; each bar is labelled with its value.
"""
from html import escape

PALETTE = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]


def bars(path, title, unit, groups, series, values, fmt="{:,.0f}"):
    bar, gap, left, width = 18, 14, 150, 560
    top = 40
    rows = len(groups) * (len(series) * bar + gap)
    height = top + rows + 30 + 20 * ((len(series) + 2) // 3)
    vmax = max(v for row in values for v in row) * 1.15 or 1
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {left + width + 90} {height}" '
           f'font-family="sans-serif" font-size="12">',
           f'<rect width="{left + width + 90}" height="{height}" fill="white"/>',
           f'<text x="10" y="20" font-size="15">{escape(title)}</text>']
    y = top
    for g, name in enumerate(groups):
        out.append(f'<text x="{left - 8}" y="{y + len(series) * bar / 2 + 4}" text-anchor="end">'
                   f'{escape(name)}</text>')
        for s in range(len(series)):
            v = values[g][s]
            w = width * v / vmax
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 3}" '
                       f'fill="{PALETTE[s % len(PALETTE)]}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 6}" fill="#333">'
                       f'{escape(fmt.format(v))}</text>')
            y += bar
        y += gap
    out.append(f'<line x1="{left}" x2="{left}" y1="{top - 4}" y2="{y - gap + 4}" stroke="#999"/>')
    out.append(f'<text x="{left + width}" y="{y + 8}" text-anchor="end" fill="#666">{escape(unit)}</text>')
    y += 24
    for s, name in enumerate(series):
        x = left + (s % 3) * 190
        yy = y + (s // 3) * 20
        out.append(f'<rect x="{x}" y="{yy - 10}" width="12" height="12" fill="{PALETTE[s % len(PALETTE)]}"/>')
        out.append(f'<text x="{x + 18}" y="{yy}">{escape(name)}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")
