"""The front page and docs/: every relative link points at a file (and a heading) that exists,
and the README stays a front page (at most 200 lines)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def anchor(heading):
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces → '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page):
    return {anchor(line.lstrip("#")) for line in page.read_text().splitlines()
            if re.match(r"#{1,6} ", line)}


def relative_links(page):
    in_code = False
    for line in page.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code:
            yield from (target for target in LINK.findall(line)
                        if not re.match(r"[a-z]+:", target))      # http:, https:, mailto:


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_an_existing_file(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file})")
        elif fragment and file.suffix == ".md" and fragment not in anchors(file):
            broken.append(f"{target} (no heading '{fragment}' in {file.name})")
    assert not broken, f"{page.name} links to what does not exist: " + "; ".join(broken)


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines; move detail into docs/"


def test_no_page_points_at_one_machine_or_at_the_projects_history():
    for page in PAGES:
        text = page.read_text()
        for pattern in (r"/work/", r"/home/", r"\.\./shared/", r"\bcommit [0-9a-f]{7,}", r"today's"):
            assert not re.search(pattern, text), f"{page.name} mentions {pattern!r}"


# ---------------------------------------------------------------------------- the help a user reads


def help_of(*command):
    from ddref import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices[command[0]].format_help() if command else parser.format_help()


def test_distill_help_has_no_empty_default_and_no_internal_options():
    text = " ".join(help_of("distill").split())
    assert "(default )" not in text
    assert "--train-pool" not in text and "--eval-pool" not in text
    assert "same seed, thread count and BLAS kernel" in text


def test_table_help_names_its_default_grid_which_takes_minutes():
    from ddref import cli

    args = cli.build_parser().parse_args(["table"])
    assert args.grid == "small"
    assert "small (the default" in " ".join(help_of("table").split())


def test_a_progress_bar_is_not_written_into_a_file(tmp_path, monkeypatch):
    """stderr redirected to a file: the run prints its lines, not thousands of redrawn bars."""
    import subprocess
    import sys

    log = tmp_path / "log"
    with open(log, "w") as stderr:
        done = subprocess.run([sys.executable, "-m", "ddref", "distill", "--iterations", "30",
                               "--steps", "1", "--epochs", "1", "--eval-every", "0",
                               "--eval-inits", "1", "--baseline-draws", "1",
                               "--out", str(tmp_path / "run")],
                              stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=300,
                              env={**__import__("os").environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, log.read_text()
    assert "\r" not in log.read_text() and log.stat().st_size < 2000, log.read_text()[:300]
    assert "1 step × 1 epoch, 10 images per step" in done.stdout
