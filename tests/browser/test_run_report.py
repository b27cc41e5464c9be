"""The run report of the small trained store's real evaluation, opened in headless Chromium: the metrics
table, the HR/NDCG chart's bars (label and drawn height), the SID code usage per level, the collision rate,
the unconstrained-invalid rate and the example counts are those of report.json (and of the evaluated SID
version's report.json), and the page fetches nothing. (A module of its own: the eval stage's Ray Data actors
need the CPUs that the demo page's Serve app holds while its module runs.)"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.browser.pages import shot, wait

METRICS = ("hr@1", "ndcg@1", "hr@5", "ndcg@5", "hr@10", "ndcg@10")
LEVELS = "abcdefgh"

# the rects with a <title> of the first chart after the <h2> named arguments[0], as [title, drawn height]
CHART_BARS = """
const h2 = [...document.querySelectorAll('h2')].find((e) => e.textContent === arguments[0]);
let node = h2.nextElementSibling;
while (node && node.tagName.toLowerCase() !== 'svg' && node.tagName !== 'H2') node = node.nextElementSibling;
return [...node.querySelectorAll('rect')].filter((r) => r.querySelector('title'))
  .map((r) => [r.querySelector('title').textContent, r.getBoundingClientRect().height]);
"""
TABLES = "return [...document.querySelectorAll('table')].map((t) => [...t.rows].map((r) => " \
         "[...r.cells].map((c) => c.textContent)))"


def check_bars(bars: list, expected: dict[str, float]) -> None:
    """One bar per expected label, each drawn with a height proportional to its value (within a pixel)."""
    assert sorted(label for label, _ in bars) == sorted(expected)
    tallest_label, tallest = max(bars, key=lambda b: b[1])
    px_per_unit = tallest / expected[tallest_label]
    for label, height in bars:
        assert abs(height - expected[label] * px_per_unit) <= 1.0, (label, height, px_per_unit)


def check_report_page(driver, report: dict, sids: dict) -> None:
    """The figures of the report page open in ``driver`` against report.json and the SIDs' report.json."""
    tables = driver.execute_script(TABLES)
    head, *rows = tables[0]
    assert head[2:8] == [m.upper() for m in METRICS]
    ours = {row[0]: row for row in rows if row[1] == "this run"}
    assert set(ours) == set(report["models"])
    for name, m in report["models"].items():
        assert ours[name][2:8] == [f"{m[k]:.4f}" for k in METRICS], name
    check_bars(driver.execute_script(CHART_BARS, "HR / NDCG @ K"),
               {f"{name} {k.upper()}: {m[k]:.4f}": m[k] for name, m in report["models"].items() for k in METRICS})
    # SID code usage per level: the table and the chart's used-share bars
    k = sids["summary"]["codebook_size"]
    usage = next(t for t in tables if t[0][:3] == ["level", "codes used", "share of codebook"])
    assert [r[:3] for r in usage[1:]] == [[LEVELS[u["level"]], f"{u['used']} / {k}", f"{u['used_share']:.1%}"]
                                         for u in sids["code_usage"]]
    bars = [b for b in driver.execute_script(CHART_BARS, "Semantic IDs") if b[0].startswith("codes used")]
    assert [b[0] for b in bars] == [f"codes used (share of codebook) level {LEVELS[u['level']]}: "
                                    f"{u['used_share']:.1%}" for u in sids["code_usage"]]
    body = driver.find_element("tag name", "body").text
    s = sids["summary"]
    assert (f"before {s['collision_policy']}: {s['collision_share_before']:.2%} (largest group "
            f"{s['largest_group_before']}); after: {s['collision_share_after']:.2%}" in body)
    share = report["unconstrained_invalid_share"]
    assert (f"{report['unconstrained_examples']} examples: {share:.1%} of the top-10 outputs are not real items"
            in body)
    assert f"{report['examples']} examples, full ranking over {report['catalog_items']} items" in body
    assert driver.execute_script("return performance.getEntriesByType('resource').length") == 0  # fetches nothing


@pytest.mark.slow
def test_run_report_figures_equal_report_json(browser, trained_store, artifacts):
    from sidrec.eval.report_store import html_report_path
    from sidrec.stages import eval as evaluation
    from sidrec.store import ArtifactStore

    cfg, root = trained_store
    store = ArtifactStore(root)
    evaluation.build(store, cfg)  # the real eval stage (skipped when another test built it already)
    report = store.read_json(f"{store.current_path('eval_test')}/report.json")
    assert set(report["models"]) == {"sid-llm", "most-popular", "sasrec"}
    sids = store.read_json(f"{store.stage_dir('sids')}/{report['sids_version']}/report.json")
    path = Path(html_report_path(root, "test"))
    assert path.parent == Path(store.current_path("eval_test")) and path.exists()
    browser.get(path.as_uri())
    wait(browser, lambda d: d.execute_script("return document.readyState") == "complete", "the report")
    check_report_page(browser, report, sids)
    shot(browser, artifacts, "05-run-report.png",
         f"the run report {path}: metrics table, HR/NDCG chart, curves, SID usage (figures = report.json)")
    copy = shutil.copy(path, artifacts / "05-run-report.html")
    print(f"report page {copy}: the page itself")
