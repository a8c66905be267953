"""The `dvc plots` page loads nothing from the network: DVC renders into plots/template.html."""

import subprocess
import sys
from pathlib import Path

from tests.e2e import REPO


def test_dvc_is_configured_with_the_self_contained_template():
    config = (REPO / ".dvc/config").read_text()
    assert "html_template = ../plots/template.html" in config  # relative to .dvc/
    template = (REPO / "plots/template.html").read_text()
    assert "{plot_divs}" in template and "{scripts}" not in template  # {scripts} would bring the CDN back
    assert "cdn." not in template and "<script src=" not in template


def test_the_template_is_built_from_the_pinned_vega_files():
    result = subprocess.run([sys.executable, "plots/make_template.py", "--check"], cwd=REPO, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dvc_renders_a_page_with_no_network_reference(tmp_path):
    from dvc_render.html import render_html
    from dvc_render.vega import VegaRenderer

    properties = {"x": "epoch", "y": "accuracy", "template": "linear"}
    renderer = VegaRenderer([{"epoch": 1, "accuracy": 0.9, "rev": "workspace"}], "Accuracy", **properties)
    page = render_html([renderer], tmp_path / "index.html", html_template=REPO / "plots/template.html")
    html = Path(page).read_text()
    assert "vegaEmbed" in html and "jsdelivr" not in html
