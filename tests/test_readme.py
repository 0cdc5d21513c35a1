"""The README's opening commands and its Python example are part of the contract."""

import doctest
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_setup_commands():
    head = "\n".join(README.splitlines()[:40])
    assert re.search(r"^make demo\b", head, re.M) and re.search(r"^make test\b", head, re.M)


def test_python_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "the README has no python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    last, best = re.fullmatch(r"last (\S+), at best val (\S+)", out[0]).groups()
    assert 0.5 < float(last) <= 1.0 and 0.5 < float(best) <= 1.0  # 3 epochs already learn digits
    assert out[1] == "{'2': (128,), 'logits': (10,)}"


@pytest.mark.parametrize("doc", sorted(p.name for p in (ROOT / "docs").glob("*.md")))
def test_docs_examples_run(doc):
    """The python blocks of a docs page run in order, as one script."""
    text = (ROOT / "docs" / doc).read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, f"docs/{doc} has no python example"
    exec(compile("\n".join(blocks), f"docs/{doc}", "exec"), {})


@pytest.mark.parametrize(
    "module",
    [
        "flowdistill",
        "flowdistill.taps",
        "flowdistill.adapters",
        "flowdistill.config",
        "flowdistill.nf",
        "flowdistill.data.text",
        "flowdistill.data.inputs",
        "flowdistill.distillers.cached",
    ],
)
def test_docstring_examples(module):
    result = doctest.testmod(importlib.import_module(module))
    assert result.failed == 0


TABLES = re.findall(r"<!-- table: (\S+)( no-timing)? -->\n(.*?)<!-- end table -->", README, re.S)


def test_readme_has_results_tables():
    assert any(path.startswith("benchmarks/digits/") for path, _, _ in TABLES)


@pytest.mark.parametrize("path,no_timing,table", TABLES, ids=[p for p, _, _ in TABLES])
def test_readme_tables_are_the_committed_results(path, no_timing, table):
    """Every README results table is exactly what `flowdistill table --compact` prints for the
    committed results.json it names, and that file records the command that made it."""
    import json

    from flowdistill.bench import compact_table
    from flowdistill.bench.report import merge_results

    paths = path.split("+")  # several: benches of one recipe, merged (flowdistill table A B)
    parts = [json.loads((ROOT / p).read_text()) for p in paths]
    results = parts[0] if len(parts) == 1 else merge_results(parts, paths)
    assert table == compact_table(results, timing=not no_timing)
    for part_path, part in zip(paths, parts, strict=True):
        prov = part["provenance"]
        assert prov["command"].startswith("flowdistill bench") and prov["commit"]
        assert f"--out {Path(part_path).parent}" in prov["command"]
        assert prov["command"] in README
    if len(paths) > 1:
        assert f"flowdistill table --compact --no-timing {' '.join(paths)}" in README


COSTS = re.findall(r"<!-- cost: (\S+) -->\n(.*?)<!-- end cost -->", README, re.S)


@pytest.mark.parametrize("path,table", COSTS, ids=[p for p, _ in COSTS])
def test_readme_cost_tables_are_the_committed_measurements(path, table):
    """Each row of a README cost table restates the committed cost.json, and the module
    cost is (method − kd) / (diffkd − kd) of its step-time ratios."""
    import json

    record = json.loads((ROOT / path).read_text())
    rows = record["methods"]
    kd, diff = rows["kd"]["step_time_ratio"], rows["diffkd"]["step_time_ratio"]
    lines = table.strip().splitlines()[2:]
    assert len(lines) == len(rows)
    for line, (method, row) in zip(lines, rows.items(), strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[0] == method
        assert float(cells[1]) == pytest.approx(row["step_time_ratio"], abs=0.005)
        assert float(cells[2]) == pytest.approx(
            (row["step_time_ratio"] - kd) / (diff - kd), abs=0.005
        )
        assert int(cells[3].replace(",", "")) == row["extra_params"]
        assert int(cells[4].replace(",", "")) == row["deployed_params"]
    assert record["provenance"]["command"] in README


def _committed_benches():
    import json

    for path in sorted((ROOT / "benchmarks").glob("*/results.json")):
        results = json.loads(path.read_text())
        if results.get("kind") != "nf" and (path.parent / "runs").is_dir():
            yield pytest.param(path.parent, results, id=path.parent.name)


@pytest.mark.parametrize("folder,results", list(_committed_benches()))
def test_the_readme_commands_reuse_the_committed_runs(folder, results):
    """The keys the code computes today for a committed bench's teacher and runs are those
    the runs were saved under, so that its README command (with more seeds, say) reuses
    them rather than refusing them as runs of another configuration."""
    import json

    from flowdistill.bench import get_suite, method_config
    from flowdistill.bench.runner import _hash, _run_key, same_run, teacher_key, with_epochs
    from flowdistill.distillers import get_method

    config = results["provenance"]["config"]
    suite = with_epochs(get_suite(results["suite"]), config["epochs"], config["teacher_epochs"])
    checkpoint = results["teacher"]["checkpoint"]
    expected = f"{suite.name}-{_hash(teacher_key(suite, config['budget']))}"
    assert Path(checkpoint).parent.name == expected
    chosen = config.get("tune") or "--set" in results["provenance"]["command"]
    for method, options in config["method_options"].items():
        # the suite's defaults for the method are those it ran with (or, where the bench
        # chose or set options, under them)
        defaults = method_config(suite, method)
        if not get_method(method).uses_feature_taps:  # (taps it ignored, once passed)
            options = {k: v for k, v in options.items() if not k.endswith("_taps")}
        if chosen:
            assert set(defaults) <= set(options), method
        else:
            assert defaults == options, method
        record = folder / "runs" / method / "seed0" / "result.json"
        if not record.exists():
            continue
        saved = json.loads(record.read_text())
        options = {**method_config(suite, method), **saved["key"]["options"]}
        if not get_method(method).uses_feature_taps:
            options = {k: v for k, v in options.items() if not k.endswith("_taps")}
        teacher = {"checkpoint": checkpoint}
        if "weights" in results["teacher"]:  # (tables since runs were keyed by it)
            teacher["weights"] = results["teacher"]["weights"]
        key = _run_key(suite, method, options, 0, config["epochs"], teacher, config["budget"])
        assert same_run(saved, key), method
        # runs saved before keys held the teacher's weights are compared without them
        left = {"options"} | ({"teacher_weights"} - set(saved["key"]))
        assert {k: v for k, v in key.items() if k not in left} == {
            k: v for k, v in saved["key"].items() if k not in left
        }, method


def _slug(heading: str) -> str:
    """A heading's anchor as GitHub writes it: lower case, punctuation dropped, spaces to
    hyphens (a repeated heading gets -1, -2, ...)."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_slug_matches_githubs_anchors():
    assert _slug("cifar10-cpu: the suite's own comparison, 3 seeds") == (
        "cifar10-cpu-the-suites-own-comparison-3-seeds"
    )
    tuned = "mnist-cpu-with-options-chosen---tune"
    assert _slug("mnist-cpu with options chosen (`--tune`)") == tuned


def test_readme_links_within_itself_reach_a_heading():
    text = re.sub(r"```.*?```", "", README, flags=re.S)  # a '#' line in a code block is no heading
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.M):
        slug = _slug(heading)
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    links = re.findall(r"\]\(#([^)]+)\)", README)
    assert links, "the README links to none of its sections"
    assert [link for link in links if link not in anchors] == []
