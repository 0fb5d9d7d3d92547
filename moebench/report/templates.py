"""The report page's fixed parts: HTML templates with named slots (`string.Template`),
its CSS and its scripts. `page.py` fills them; nothing here reads data.
"""

from __future__ import annotations

from string import Template

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True, "toImageButtonOptions": {"scale": 2}}

PAGE = Template("""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="moebench $version">
<title>$title</title>
<style>:root { --font: $font; }
$css</style>
<script>$error_hook</script>
$plotly_script
</head>
<body>
<header>
<h1>$title</h1>
<p class="sub">$subtitle</p>
$environment
</header>
<pre id="moebench-errors" hidden></pre>
<nav>$nav</nav>
<main>
$verdict
$failures
$sections
$cases
</main>
<footer>Made by moebench $version on $made. Hover a point for its case; click a legend entry to
hide it, double-click to keep only it; drag to zoom, double-click to reset.</footer>
<script type="application/json" id="moebench-manifest">$manifest</script>
<script>$page_js</script>
</body>
</html>
""")

SECTION = Template("""<section id="$key">
<h2>$title</h2>
<p class="desc">$description</p>
$body
</section>
""")
FIGURE = Template('<div class="figure" data-section="$section">$plot</div>\n')
OMITTED = Template('<p class="omitted" data-omitted="$key">Left out: $reason.</p>\n')
NOTE = Template('<p class="note">$text</p>\n')
NAV_LINK = Template('<a href="#$key" class="$css_class">$title</a>')
TABLE = Template("""<div class="table-wrap $wrap_class"><table class="$css_class">
<thead><tr>$head</tr></thead>
<tbody>
$body
</tbody></table></div>
""")
HEAD_CELL = Template('<th data-type="$kind" title="click to sort">$text</th>')
ROW = Template('<tr class="$css_class">$cells</tr>\n')
CELL = Template('<td class="$css_class" data-v="$sort">$text</td>')
SWATCH = Template('<span class="swatch" style="background:$color"></span>$text')
STATUS = Template('<span class="status" style="background:$color">$text</span>')
BAR = Template('<span class="bar"><span style="width:$pct%;background:$color"></span></span>')
VERDICT = Template("""<section id="verdict" class="verdict">
<h2>At a glance</h2>
$headlines
$table
</section>
""")
HEADLINE = Template('<p class="headline $css_class">$text</p>\n')
FAILURES = Template("""<section id="failures" class="failures">
<h2>$count of $total cases did not finish ok</h2>
<p class="desc">By status: $by_status. Their errors are listed here and in the table of
cases.</p>
$table
</section>
""")
CASES = Template("""<section id="cases">
<h2>All cases</h2>
<p class="desc">One row per case; click a column head to sort. Latency is the median of the
timed calls; "vs base" is the speed relative to $base on the same case.</p>
$table
</section>
""")
ENV = Template('<div class="table-wrap env"><table class="env">$rows</table></div>')
ENV_ROW = Template("<tr><th>$key</th>$cells</tr>")
ENV_CELL = Template("<td>$value</td>")

CSS = """
:root { --ink: #1d2430; --muted: #5b6675; --line: #e3e7ec; --bg: #f6f8fa; }
* { box-sizing: border-box; }
body { font-family: var(--font); color: var(--ink); margin: 0; background: #fff; font-size: 14px; }
header { background: var(--bg); border-bottom: 1px solid var(--line); padding: 18px 28px; }
h1 { margin: 0 0 4px; font-size: 22px; }
h2 { font-size: 18px; margin: 0 0 6px; }
.sub, .desc, footer, .note { color: var(--muted); }
.desc { max-width: 70em; margin: 0 0 10px; }
nav { position: sticky; top: 0; z-index: 5; background: #fff; border-bottom: 1px solid
  var(--line); padding: 8px 28px; display: flex; flex-wrap: wrap; gap: 6px 16px; }
nav a { color: #1f5fbf; text-decoration: none; font-size: 13px; }
nav a.off { color: #9aa4b1; }
main { padding: 6px 28px 24px; }
section { padding: 16px 0 10px; border-bottom: 1px solid var(--line); }
.figure { margin: 6px 0; }
.omitted { color: var(--muted); font-style: italic; margin: 4px 0; }
.note { margin: 4px 0; font-size: 13px; }
.table-wrap { overflow: auto; max-height: 640px; border: 1px solid var(--line);
  border-radius: 6px; margin: 8px 0; }
.table-wrap.env, .table-wrap.small { max-height: none; display: inline-block; max-width: 100%; }
table { border-collapse: collapse; font-size: 12.5px; width: 100%; }
th, td { padding: 4px 9px; border-bottom: 1px solid var(--line); text-align: left;
  vertical-align: top; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.error { white-space: pre-wrap; color: #9b1c1c; max-width: 48em; min-width: 20em;
  font-family: ui-monospace, Menlo, monospace; font-size: 11.5px; }
thead th { position: sticky; top: 0; background: var(--bg); cursor: pointer;
  user-select: none; }
thead th.sorted-asc::after { content: " \\25B2"; font-size: 9px; }
thead th.sorted-desc::after { content: " \\25BC"; font-size: 9px; }
table.env th { background: var(--bg); cursor: default; position: static; }
table.env td, table.env th { white-space: normal; }
tr.failed td { background: #fff4f4; }
tr.regression td { background: #fff0f0; }
.status { color: #fff; border-radius: 3px; padding: 1px 6px; font-size: 11.5px;
  font-weight: 600; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px;
  margin-right: 6px; vertical-align: -1px; }
.bar { display: inline-block; width: 80px; height: 8px; background: #eef1f4;
  border-radius: 4px; margin-left: 8px; vertical-align: 0; overflow: hidden; }
.bar span { display: block; height: 100%; }
.verdict .headline { font-size: 16px; margin: 4px 0; }
.headline.win { font-size: 18px; }
.headline.bad { color: #9b1c1c; font-weight: 600; }
.failures h2 { color: #9b1c1c; }
#moebench-errors { background: #fff0f0; color: #9b1c1c; padding: 8px 28px; margin: 0; }
footer { padding: 12px 28px 30px; font-size: 12px; }
"""

ERROR_HOOK = """
window.moebenchErrors = [];
window.moebenchError = function (message) {
  window.moebenchErrors.push(message);
  function show() {
    var box = document.getElementById('moebench-errors');
    if (box) { box.textContent = window.moebenchErrors.join('\\n'); box.hidden = false; }
  }
  if (document.getElementById('moebench-errors')) { show(); }
  else { document.addEventListener('DOMContentLoaded', show); }
};
window.addEventListener('error', function (event) {
  window.moebenchError(String(event.message || event));
});
"""
# plotly.js inlined (one self-contained page), or loaded from a file beside the page
# (`moebench report --plotly-js DIR`: many pages, one copy), saying so where it is missing.
PLOTLY_INLINE = Template("<script>$js</script>")
PLOTLY_FILE = Template(
    '<script src="$src" onerror="moebenchError(\'plotly.js did not load from $src:'
    " the figures need that file beside this page (moebench report --plotly-js)')\"></script>"
)

PAGE_JS = """
(function () {
  function value(cell, type) {
    var raw = cell.getAttribute('data-v');
    if (type === 'num') {
      var n = parseFloat(raw);
      return isNaN(n) ? -Infinity : n;
    }
    return (raw || cell.textContent).toLowerCase();
  }
  document.querySelectorAll('table.sortable').forEach(function (table) {
    table.querySelectorAll('thead th').forEach(function (th, index) {
      th.addEventListener('click', function () {
        var type = th.getAttribute('data-type');
        var asc = !th.classList.contains('sorted-asc');
        table.querySelectorAll('thead th').forEach(function (other) {
          other.classList.remove('sorted-asc', 'sorted-desc');
        });
        th.classList.add(asc ? 'sorted-asc' : 'sorted-desc');
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = value(a.cells[index], type), y = value(b.cells[index], type);
          return (x < y ? -1 : x > y ? 1 : 0) * (asc ? 1 : -1);
        });
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
  // What a reader would see as broken: a plot area squeezed below 300 x 200 px, or a
  // figure title drawn over an axis title or tick label. Recorded on #moebench-ready.
  function overlap(a, b) {
    return a.width > 0 && b.width > 0 && a.left < b.right && b.left < a.right &&
      a.top < b.bottom && b.top < a.bottom;
  }
  function layoutProblems() {
    var small = [], overlaps = [];
    document.querySelectorAll('.js-plotly-plot').forEach(function (plot) {
      plot.querySelectorAll('rect.nsewdrag').forEach(function (rect) {
        var box = rect.getBoundingClientRect();
        if (box.width < 300 || box.height < 200) {
          small.push(plot.id + ' ' + Math.round(box.width) + 'x' + Math.round(box.height));
        }
      });
      var labels = plot.querySelectorAll('.xtitle, .ytitle, .xtick text, .ytick text');
      plot.querySelectorAll('.gtitle').forEach(function (title) {
        var box = title.getBoundingClientRect();
        labels.forEach(function (label) {
          if (overlap(box, label.getBoundingClientRect())) {
            overlaps.push(plot.id + ': "' + title.textContent + '" over "' +
              label.textContent + '"');
          }
        });
      });
    });
    return {small: small, overlaps: overlaps};
  }
  window.addEventListener('load', function () {
    var marker = document.createElement('div');
    marker.id = 'moebench-ready';
    marker.hidden = true;
    marker.setAttribute('data-plots', document.querySelectorAll('.js-plotly-plot').length);
    marker.setAttribute('data-svgs', document.querySelectorAll('svg.main-svg').length);
    marker.setAttribute('data-errors', window.moebenchErrors.length);
    var layout = layoutProblems();
    marker.setAttribute('data-small-plots', layout.small.join('; '));
    marker.setAttribute('data-overlaps', layout.overlaps.join('; '));
    document.body.appendChild(marker);
  });
})();
"""
