"""A real (tiny-model) `monoscope run` over a corpus of HTML, script and template-injection payloads: the report
and both browsers open in headless Chromium with no dialog, no console error and no request leaving the page, and
the payloads that reach a page are shown as text. A second report from the same run's stages carries a payload in
every text the report prints (explanations, steering text, the steering feature's explanation)."""
import json
from pathlib import Path

import pytest

from test_browser import CHROMIUM, PageWatch, _playwright
from test_pipeline import TINY

from monoscope.cli import main

pytestmark = pytest.mark.slow

PAYLOADS = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(2)>',
    "<svg onload=alert(3)>",
    "</pre></textarea><script>alert(4)</script>",
    "<iframe src=javascript:alert(5)></iframe>",
    '{{ "INJ" ~ "ECTED" }} {% for x in range(3) %}{{ x }}{% endfor %}',
    '${"INJ" + "ECTED"} #{"INJ" + "ECTED"} <%= "INJ" + "ECTED" %>',
    "<a href=javascript:alert(6)>click</a> &lt;b&gt;",
]
# Seen on a page only if some template evaluated a payload. A word, not a number like 1234*5 = 6170, which an
# SAE statistic's digits can contain by chance.
EVALUATED = "INJECTED"


@pytest.fixture(scope="module")
def payload_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("inject")
    words = "The station is north of the river and the museum opens at ten on Monday."
    blocks = [f"{words} {p} {words}" for p in PAYLOADS]
    (root / "payloads.txt").write_text("\n\n".join(blocks * 12) + "\n")
    (root / "run.toml").write_text(TINY + f'corpus = "{root / "payloads.txt"}"\n')
    assert main(["run", "--config", str(root / "run.toml"), "--out", str(root / "r")]) == 0
    return root / "r"


@pytest.fixture(scope="module")
def chromium():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing (apt-get install chromium)")
    with _playwright()() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _open(chromium, path: Path, site: Path):
    page = chromium.new_page()
    watch = PageWatch(page, site.as_uri())
    page.goto(path.as_uri())
    page.wait_for_load_state("load")
    return page, watch


def _no_live_payload(page):
    """No element or attribute that a payload could have planted."""
    assert page.eval_on_selector_all("script:not([src]), iframe, svg[onload], img[onerror], a[href^=javascript]",
                                     "n => n.length") == 0


def payload_report(run: Path, out: Path) -> Path:
    """The run's report rebuilt into ``out`` with a payload in every text it prints."""
    from monoscope.interpret.steering_demo import SteeringDemo
    from monoscope.models import load_model
    from monoscope.pipeline import RunConfig, load_run_config, plan_run
    from monoscope.report.findings import write_report
    from monoscope.stages import Run

    cfg: RunConfig = load_run_config(run / "run.toml")
    views = {name: Run(run, log=lambda _: None).finished(name).view()
             for name in ("extract", "saes", "probe", "stats", "explain", "steer")}
    explained = {}
    for kind in ("features", "neurons"):
        path = out / f"{kind}.jsonl"
        lines = [json.dumps({"feature": i, "status": "ok", "explanation": p, "detection": {"accuracy": 0.5}})
                 for i, p in enumerate(PAYLOADS)]
        path.write_text("\n".join(lines) + "\n")
        explained[kind] = str(path)
    steering = SteeringDemo.load(views["steer"]["demo"]).to_dict()
    steering.update(explanation=PAYLOADS[0], examples=[{"default": p, "steered": p} for p in PAYLOADS])
    lm = load_model(cfg.model)
    return write_report(out, cfg=cfg, plan=plan_run(cfg, lm), lm=lm, ext=views["extract"], saes=views["saes"],
                        probe=views["probe"], stats=views["stats"], explained=explained, steering=steering,
                        timings={}, versions={"payload": PAYLOADS[1]})


def test_run_over_payloads_in_chromium(payload_run, chromium):
    for page_path in (payload_run / "report.html", payload_run / "browser" / "index.html",
                      payload_run / "browser_neurons" / "index.html"):
        page, watch = _open(chromium, page_path, payload_run)
        _no_live_payload(page)
        assert EVALUATED not in page.content()
        watch.check()
        page.close()
    # a feature page shows the corpus's payloads as text among its top examples
    feature = sorted((payload_run / "browser").glob("features/*.html"))[0]
    page, watch = _open(chromium, feature, payload_run)
    _no_live_payload(page)
    text = page.text_content("body")
    assert any(p[:8] in text for p in ("<script>alert(1)", '"><img src', "<svg onl", "{{ 1234*")), text[:500]
    watch.check()


def test_payloads_in_every_report_text_stay_text(payload_run, chromium, tmp_path):
    path = payload_report(payload_run, tmp_path)
    page, watch = _open(chromium, path, tmp_path)
    _no_live_payload(page)
    text = page.text_content("body")
    for p in PAYLOADS:
        assert p in text, p
    assert EVALUATED not in text
    watch.check()
