"""--model-explorer: node data files that Model Explorer's ONNX adapter lays on the graph.

The files are checked against Model Explorer's own package when it is installed
(``ai-edge-model-explorer`` and ``model-explorer-onnx``, the `test` extra): the node ids
must be those its ONNX adapter gives the graph, and the files must load into its
``node_data_builder`` classes and serialise back to the same JSON.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from conftest import ROOT
from layerdiff import model_explorer
from layerdiff.cli import main

SAMPLES = ROOT / "samples"
MODEL = SAMPLES / "compact_x4.pth"


def _report(tmp_path, capsys, onnx_file: Path, *extra):
    folder = tmp_path / "explorer"
    model = SAMPLES / ("esrgan_x2.pth" if onnx_file.name.startswith("esrgan") else "compact_x4.pth")
    code = main(["report", str(model), "--onnx", str(onnx_file), "-o", str(tmp_path / "r.html"),
                 "--json", str(tmp_path / "d.json"), "--check-sizes", "none",
                 "--model-explorer", str(folder), *extra])
    out, err = capsys.readouterr()
    data = {kind: json.loads((folder / f"{kind}.json").read_text())
            for kind in model_explorer.KINDS}
    return code, out, err, data, folder


def _adapter_graph(onnx_file: Path):
    """The main graph as Model Explorer's ONNX adapter builds it: its id and node ids."""
    adapter = pytest.importorskip("model_explorer_onnx.main")
    graph = adapter.ONNXAdapter().convert(str(onnx_file), {})["graphs"][0]
    return graph.id, {node.id for node in graph.nodes}


def _loads_in_model_explorer(path: Path) -> None:
    """Build Model Explorer's own ModelNodeData from the file: every field must be one
    of its classes' fields, and serialising it again gives the same JSON."""
    ndb = pytest.importorskip("model_explorer.node_data_builder")
    raw = json.loads(path.read_text())
    graphs = {
        graph_id: ndb.GraphNodeData(
            results={k: ndb.NodeDataResult(**v) for k, v in g["results"].items()},
            thresholds=[ndb.ThresholdItem(**t) for t in g.get("thresholds", [])],
            gradient=[ndb.GradientItem(**t) for t in g.get("gradient", [])],
            **{k: v for k, v in g.items() if k not in ("results", "thresholds", "gradient")})
        for graph_id, g in raw.items()}
    again = json.loads(ndb.ModelNodeData(graphsData=graphs).to_json_string())
    # The same, plus the defaults of the fields not written.
    assert {g: {k: again[g][k] for k in raw[g]} for g in raw} == raw
    for g in graphs.values():
        assert all(isinstance(r.value, (int, float)) for r in g.results.values())


def test_faulty_file_paints_the_diverging_node_worst(tmp_path, capsys):
    faulty = SAMPLES / "compact_x4_dcr.onnx"
    code, out, err, data, folder = _report(tmp_path, capsys, faulty)
    assert code == 1, err
    graph_id, node_ids = _adapter_graph(faulty)
    d = json.loads((tmp_path / "d.json").read_text())
    first = d["first_divergence"]["onnx_node"]  # /upsampler/DepthToSpace
    for kind in model_explorer.KINDS:
        _loads_in_model_explorer(folder / f"{kind}.json")
        assert list(data[kind]) == [graph_id]
        results = data[kind][graph_id]["results"]
        assert results and set(results) <= node_ids, set(results) - node_ids
    status = data["status"][graph_id]["results"]
    assert status[first]["value"] == model_explorer.FIRST
    assert max(v["value"] for v in status.values()) == model_explorer.FIRST
    own = data["own_error"][graph_id]["results"]
    # The cause has by far the largest own error; what follows only carries it.
    assert max(own, key=lambda k: own[k]["value"]) == first
    layers = {l["onnx_node"]: l for l in d["layers"]}
    output = f"[value] {d['outputs'][0]['name']}"
    assert status[output]["value"] == model_explorer.STATUS_CODES["fail"]
    total = data["total_error"][graph_id]["results"]
    assert total[first]["value"] == pytest.approx(
        layers[first]["max_abs"] / layers[first]["scale"])
    # The command names the file, the flag Model Explorer's command line has, the files.
    line = next(l for l in out.splitlines() if l.startswith("model explorer: "))
    assert "--extensions=model_explorer_onnx" in line and str(faulty) in line
    assert "--node_data_paths=" + ",".join(str(folder / f"{k}.json")
                                           for k in model_explorer.KINDS) in line


def test_error_carried_downstream_is_propagated_on_the_graph(tmp_path, capsys):
    # A chaiNNer-style file (no module names) with one LeakyReLU slope changed mid-way.
    faulty = SAMPLES / "esrgan_x2_nameless_slope.onnx"
    code, _, err, data, _ = _report(tmp_path, capsys, faulty, "--reference", "none")
    assert code == 1, err
    graph_id, node_ids = _adapter_graph(faulty)
    d = json.loads((tmp_path / "d.json").read_text())
    status = data["status"][graph_id]["results"]
    assert set(status) <= node_ids
    codes = model_explorer.STATUS_CODES
    propagated = [l["onnx_node"] for l in d["layers"] if l["status"] == "propagated"]
    assert propagated and all(status[n]["value"] == codes["propagated"] for n in propagated)
    first = d["first_divergence"]["onnx_node"]
    own = data["own_error"][graph_id]["results"]
    total = data["total_error"][graph_id]["results"]
    # Downstream nodes' total error is large, their own error small: only the cause's is.
    assert max(own, key=lambda k: own[k]["value"]) == first
    assert all(own[n]["value"] < own[first]["value"] / 100 for n in propagated)
    assert max(total[n]["value"] for n in propagated) > own[first]["value"] / 100


def test_clean_file_is_all_pass_and_within_the_first_thresholds(tmp_path, capsys):
    clean = SAMPLES / "compact_x4.onnx"
    code, _, err, data, folder = _report(tmp_path, capsys, clean)
    assert code == 0, err
    graph_id, node_ids = _adapter_graph(clean)
    status = data["status"][graph_id]["results"]
    assert status and set(status) <= node_ids
    assert {v["value"] for v in status.values()} == {0}
    # The graph output has its own node in Model Explorer ("[value] NAME").
    assert any(k.startswith("[value] ") for k in status)
    total = data["total_error"][graph_id]["results"]
    assert max(v["value"] for v in total.values()) < 1e-3


def test_unnamed_nodes_get_the_adapters_ids(tmp_path, capsys):
    # Files without node names exist; the adapter names them (onnx_ir's NameFixPass:
    # "node", "node_1", ... in file order).
    model = onnx.load(str(SAMPLES / "compact_x4_dcr.onnx"))
    model.graph.name = ""
    position = next(i for i, n in enumerate(model.graph.node) if n.op_type == "DepthToSpace")
    for i, node in enumerate(model.graph.node):
        node.name = "" if i % 3 or node.op_type == "DepthToSpace" else f"named_{i}"
    unnamed = tmp_path / "unnamed.onnx"
    onnx.save(model, str(unnamed))
    code, _, err, data, _ = _report(tmp_path, capsys, unnamed)
    assert code == 1, err
    graph_id, node_ids = _adapter_graph(unnamed)
    status = data["status"][graph_id]["results"]
    assert set(status) <= node_ids
    unnamed_before = sum(1 for i, n in enumerate(model.graph.node) if i < position and not n.name)
    first = f"node_{unnamed_before}" if unnamed_before else "node"
    assert status[first]["value"] == model_explorer.FIRST
    _same_ids_as_the_adapter(unnamed)


def test_node_ids_follow_the_adapter_on_names_used_twice(tmp_path):
    # onnxruntime refuses such a file, so it is never diagnosed; the ids still match.
    model = onnx.load(str(SAMPLES / "compact_x4.onnx"))
    for i, node in enumerate(model.graph.node):
        node.name = ("same", "", "node", "Conv")[i % 4]
    path = tmp_path / "twice.onnx"
    onnx.save(model, str(path))
    _same_ids_as_the_adapter(path)


def _same_ids_as_the_adapter(path: Path) -> None:
    """Every node id NodeIds gives is the id of the adapter's node with that output."""
    ids = model_explorer.NodeIds.of(onnx.load(str(path)))
    adapter = pytest.importorskip("model_explorer_onnx.main")
    graph = adapter.ONNXAdapter().convert(str(path), {})["graphs"][0]
    assert graph.id == ids.graph
    checked = 0
    for node in graph.nodes:
        for meta in node.outputsMetadata:
            tag = next((a.value for a in meta.attrs if a.key == "__tensor_tag"), None)
            if tag in ids.by_tensor and node.label != "Input":
                assert ids.by_tensor[tag] == node.id, (tag, node.id)
                checked += 1
    assert checked == len(set(ids.by_tensor.values()))


def test_model_explorer_folder_is_checked_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code = main(["report", str(MODEL), "--onnx", str(SAMPLES / "compact_x4.onnx"),
                 "-o", str(tmp_path / "r.html"), "--model-explorer", str(blocker)])
    assert code == 2
    assert "--model-explorer" in capsys.readouterr().err
    # Nor the path of another output.
    code = main(["report", str(MODEL), "--onnx", str(SAMPLES / "compact_x4.onnx"),
                 "-o", str(tmp_path / "r.html"), "--model-explorer", str(tmp_path / "r.html")])
    err = capsys.readouterr().err
    assert code == 2 and "same file" in err and "--model-explorer" in err
    assert not (tmp_path / "r.html").exists()


CHROMIUM = os.environ.get("LAYERDIFF_CHROMIUM", "/usr/bin/chromium")


def test_model_explorer_itself_shows_the_files_on_the_graph(tmp_path, capsys):
    """The real thing: Model Explorer's server and web app (headless Chromium) open the
    faulty file with the three files, and its node table lists them per node."""
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"chromium not found at {CHROMIUM}: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    config_module = pytest.importorskip("model_explorer.config")
    pytest.importorskip("model_explorer_onnx")
    server_bin = Path(sys.executable).with_name("model-explorer")
    if not server_bin.is_file():
        pytest.skip("the model-explorer command is not installed next to this python")
    faulty = SAMPLES / "compact_x4_dcr.onnx"
    _, _, _, _, folder = _report(tmp_path, capsys, faulty)
    files = [folder / f"{kind}.json" for kind in model_explorer.KINDS]
    with socket.socket() as probe:
        probe.bind(("localhost", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [str(server_bin), "--extensions=model_explorer_onnx", str(faulty),
         "--node_data_paths=" + ",".join(map(str, files)), "--no_open_in_browser",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        config = config_module.ModelExplorerConfig().add_model_from_path(str(faulty))
        for path in files:
            config.add_node_data_from_path(str(path))
        url = f"http://localhost:{port}/?data={config.to_url_param_value()}"
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                                         args=["--no-sandbox", "--use-gl=swiftshader",
                                               "--enable-unsafe-swiftshader"])
            try:
                page = browser.new_page(viewport={"width": 1600, "height": 1000})
                text, loaded = "", False
                for _ in range(120):  # the server starts, then the app loads the graph
                    try:
                        if not loaded:
                            page.goto(url)
                            loaded = True
                        text = page.inner_text("body")
                    except sync_api.Error:  # the server is not listening yet
                        pass
                    if re.search(r"DepthToSpace\t\S+\t\S+\t5\b", text):
                        break
                    time.sleep(1)
            finally:
                browser.close()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    for name in ("layerdiff total error", "layerdiff own error", "layerdiff status"):
        assert name in text
    # The diverging node: its total and own error, and status 5 (first divergence).
    assert re.search(r"DepthToSpace\t1\.4\d*\t1\.4\d*\t5\b", text), text[-3000:]
