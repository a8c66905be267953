"""The `dvc plots` page loads nothing from the network: DVC renders into plots/template.html."""

import re
import subprocess
import sys
from pathlib import Path

from tests.e2e import REPO

# A script, stylesheet or image fetched from another host: what would make the page need the network.
FETCHED = re.compile(r"<(?:script|link|img)\b[^>]*\b(?:src|href)\s*=\s*[\"']?(?:https?:)?//", re.IGNORECASE)


def test_dvc_reads_the_self_contained_template_from_its_config():
    from dvc.repo import Repo

    configured = Repo(str(REPO)).config["plots"]["html_template"]
    assert (REPO / ".dvc" / configured).resolve() == (REPO / "plots/template.html").resolve()
    template = (REPO / "plots/template.html").read_text()
    assert template.count("{plot_divs}") == 1
    assert "{scripts}" not in template  # DVC would put its CDN <script src=...> tags there
    assert FETCHED.findall(template) == []
    assert re.findall(r"<script\b[^>]*>", template) == ["<script>"] * 3  # vega, vega-lite, vega-embed, inline


def test_the_template_is_built_from_the_pinned_vega_files():
    result = subprocess.run([sys.executable, "plots/make_template.py", "--check"], cwd=REPO, capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dvc_renders_a_page_with_the_plot_and_no_network_reference(tmp_path):
    from dvc_render.html import render_html
    from dvc_render.vega import VegaRenderer

    properties = {"x": "epoch", "y": "accuracy", "template": "linear"}
    renderer = VegaRenderer([{"epoch": 1, "accuracy": 0.9, "rev": "workspace"}], "Accuracy", **properties)
    page = render_html([renderer], tmp_path / "index.html", html_template=REPO / "plots/template.html")
    html = Path(page).read_text()
    assert FETCHED.findall(html) == []
    assert html.count("vegaEmbed(") == 1  # the one plot, drawn by the inlined vega-embed
    assert '"accuracy": 0.9' in html  # its data, in the page


def test_the_line_plots_draw_each_revision_narrower_than_the_one_before():
    """`dvc plots diff main <exp>`: an experiment's first epochs can be the baseline's to the bit, and a
    curve drawn over an identical one hides it. The first revision's line, drawn first, is the widest."""
    import yaml
    from dvc.repo import Repo
    from dvc_render.vega import VegaRenderer
    from dvc_render.vega_templates import LinearTemplate, get_template

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    templates = {name: plot.get("template") for entry in plots for name, plot in entry.items()}
    assert templates["Accuracy"] == templates["Loss"] == "linear_overlap"
    template = get_template("linear_overlap", Repo(str(REPO)).plots.templates_dir)

    epochs = [{"epoch": epoch, "accuracy": 0.9 + epoch / 100} for epoch in range(1, 11)]
    data = [{**row, "rev": "main"} for row in epochs[:5]] + [{**row, "rev": "vivid-puds"} for row in epochs]
    spec = VegaRenderer(data, "Accuracy", x="epoch", y="accuracy", template=template).get_filled_template()
    [line] = [layer for layer in spec["layer"][0]["layer"] if layer["mark"] == "line"]
    width = line["encoding"]["strokeWidth"]
    assert (width["field"], width["sort"]) == ("rev", None)  # a width per revision, in the data's order,
    assert list(dict.fromkeys(row["rev"] for row in spec["data"]["values"])) == ["main", "vivid-puds"]
    assert width["scale"]["range"] == sorted(set(width["scale"]["range"]), reverse=True)  # narrower and narrower
    assert len(width["scale"]["range"]) >= 2

    # Otherwise DVC's own template, as `dvc plots templates linear` prints it.
    unchanged = get_template("linear_overlap", Repo(str(REPO)).plots.templates_dir).content
    del unchanged["layer"][0]["layer"][0]["encoding"]
    assert unchanged == LinearTemplate.DEFAULT_CONTENT
