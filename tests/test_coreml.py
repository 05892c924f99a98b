"""Core ML: detection of .mlmodel/.mlpackage by content, validation, signature and
parameter counts against the source, precision, lineage metadata, and the honest
"not executed" on Linux. Conversions per edge are in test_convert_matrix."""

from __future__ import annotations

import shutil
import sys

import pytest

from edgeops import convert as C
from edgeops import formats as F
from edgeops.errors import FormatError, NotExecutableError
from edgeops.inspect import inspect_model
from edgeops.samples import torch_models

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    d = tmp_path_factory.mktemp("coreml")
    s = torch_models(d)[0]   # the traced CNN
    out = {}
    for to in ("mlpackage", "mlmodel"):
        out[to] = d / f"cnn.{to}"
        out[to + "_report"] = C.convert(s.path, out[to], to=to)
    out["fp16"] = d / "cnn16.mlpackage"
    C.convert(s.path, out["fp16"], to="mlpackage", precision="fp16")
    out["source"] = s.path
    return out


def test_detect_by_content(converted, tmp_path):
    assert F.detect(converted["mlpackage"]).id == "mlpackage"
    assert F.detect(converted["mlmodel"]).id == "mlmodel"
    odd = tmp_path / "model.onnx"          # a .mlmodel under a misleading name
    shutil.copy(converted["mlmodel"], odd)
    assert F.detect(odd).id == "mlmodel"
    odd_dir = tmp_path / "model_dir"
    shutil.copytree(converted["mlpackage"], odd_dir)
    assert F.detect(odd_dir).id == "mlpackage"


def test_truncated_mlmodel(converted, tmp_path):
    data = converted["mlmodel"].read_bytes()
    p = tmp_path / "cut.mlmodel"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated or corrupt"):
        F.detect(p)


def test_package_without_spec_refused(converted, tmp_path):
    broken = tmp_path / "broken.mlpackage"
    shutil.copytree(converted["mlpackage"], broken)
    (broken / "Data/com.apple.CoreML/model.mlmodel").unlink()
    with pytest.raises(FormatError, match="without its model spec"):
        F.detect(broken)


@pytest.mark.skipif(sys.platform == "darwin", reason="Core ML executes on macOS")
def test_not_executed_on_linux_never_passed(converted):
    for to in ("mlpackage", "mlmodel"):
        rep = converted[to + "_report"]
        assert rep.status == "not-executed" and not rep.passed
        assert rep.hops[-1].parity.status == "not-executed"
        with pytest.raises(NotExecutableError, match="no Core ML runtime on this OS"):
            F.runner(converted[to])


def test_signature_params_precision_and_lineage(converted):
    src = inspect_model(converted["source"])
    pkg = inspect_model(converted["mlpackage"])
    nn = inspect_model(converted["mlmodel"])
    # coremltools folds the BatchNorm (weight, bias, running mean, running var: 4 x 8
    # channels) into the convolution before it; everything else is kept
    assert pkg["params"] == nn["params"] == src["params"] - 4 * 8
    assert pkg["precision"] == "fp32"                      # not coremltools' fp16 default
    assert inspect_model(converted["fp16"])["precision"] == "fp16"
    assert pkg["signature"]["inputs"][0]["name"] == src["signature"]["inputs"][0]["name"]
    assert pkg["signature"]["inputs"][0]["shape"] == src["signature"]["inputs"][0]["shape"]
    assert pkg["signature"]["outputs"][0]["name"] == "output_0"
    assert pkg["metadata"]["edgeops.parity"] == "not-executed"
    assert pkg["lineage"]["source"]["format"] == "torchscript"
    assert nn["model_type"] == "neuralNetwork" and pkg["model_type"] == "mlProgram"
