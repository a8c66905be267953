"""Write plots/template.html: DVC's plots page with Vega, Vega-Lite and Vega-Embed inlined.

DVC (dvc_render.html.render_html) reads the page template named by the config option
`plots.html_template` (a relative path there is taken from the .dvc/ folder) and replaces
three placeholders in it: {plot_divs} (required), {scripts} and {refresh_tag}. It inlines
nothing itself: whatever the template holds is copied into dvc_plots/index.html as is. So the
three libraries are put inside the template, and the template leaves out {scripts}, which is
where DVC would put its own <script src="https://cdn.jsdelivr.net/..."> tags.

Usage (from the repository root, standard library only):
    python plots/make_template.py           # (re)writes plots/template.html
    python plots/make_template.py --check   # exit 1 if plots/template.html is not what it would write

The .min.js files are the builds of the npm packages, byte for byte; their SHA-256 are pinned
below, so a changed or truncated file stops this script. To update: `npm pack vega@X
vega-lite@Y vega-embed@Z`, copy build/*.min.js here, update VERSIONS and SHA256.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# name -> (version, SHA-256 of the file as in the npm package's build/ folder)
VERSIONS = {
    "vega": "5.33.1",
    "vega-lite": "5.23.0",
    "vega-embed": "6.29.0",
}
SHA256 = {
    "vega": "463f3db6a40b20e9747b4ed38f37ed0add508838f9141b1cf8366784b07b30c8",
    "vega-lite": "58c27358e26f2d319cf62f45bc17a4c8362f08645001df2ec8d341eee4097c7f",
    "vega-embed": "12d02acfbe3ec59ef9a37dd4822a2e04e2961b5bbb671bbe661d2221715b99da",
}
COPYRIGHT = "Copyright (c) University of Washington Interactive Data Lab"

# The placeholders must not occur anywhere but where DVC is to fill them in: DVC replaces
# every occurrence, in comments and scripts too.
HEAD = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Made by plots/make_template.py: Vega, Vega-Lite and Vega-Embed inlined (BSD-3-Clause,
         see plots/THIRD_PARTY_LICENSES.txt), so this page needs no network. -->
"""
TAIL = """    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def _script(name: str) -> str:
    data = (HERE / f"{name}.min.js").read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256[name]:
        sys.exit(f"make_template: plots/{name}.min.js has SHA-256 {digest}, expected {SHA256[name]}")
    text = data.decode("utf-8")
    for bad in ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad.lower() in text.lower():
            sys.exit(f"make_template: plots/{name}.min.js contains {bad!r}; it cannot be inlined as is")
    # The source map is not shipped: drop the comment that points to it.
    lines = [line for line in text.splitlines() if not line.startswith("//# sourceMappingURL=")]
    banner = f"/*! {name} {VERSIONS[name]} | BSD-3-Clause | {COPYRIGHT} */"
    return "    <script>" + banner + "\n" + "\n".join(lines) + "\n    </script>\n"


def render() -> str:
    return HEAD + "".join(_script(name) for name in VERSIONS) + TAIL


def main(argv: list[str]) -> int:
    out = HERE / "template.html"
    page = render()
    if argv[1:] == ["--check"]:
        current = out.read_text(encoding="utf-8") if out.exists() else None
        if current != page:
            print("make_template: plots/template.html is out of date; run python plots/make_template.py")
            return 1
        return 0
    if argv[1:]:
        print(__doc__)
        return 2
    out.write_text(page, encoding="utf-8", newline="\n")
    print(f"make_template: wrote {out} ({out.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
