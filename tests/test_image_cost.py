"""What one image may cost the real service, and that a decoder's refusal is that image's error, on every
entry point: rexnet-serve's Pipeline HTTP and v2 REST front doors (one service for the module, the defaults
of cpu.yml), the bRPC image feed (rexnet_serving.brpc.service, in process) and rexnet-predict.

Memory is the service's: the kernel's peak resident size (VmHWM) of every process of rexnet-serve's process
group, reset before each request (``5`` into /proc/PID/clear_refs) so an earlier peak cannot hide or fake
one, compared with the resident size (VmRSS) just before.
"""
from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Dict, Iterator, List

import rexnet_serving.imageio  # noqa: F401  (before paddle: see that module)
import numpy as np
import pytest
import requests

from images import bmp_strip, encode, photo
from rexnet_serving import pipeline_wire
from rexnet_serving.imageio import REQUEST_MEMORY_BUDGET_MB
from servers import ServiceProcess

pytestmark = pytest.mark.server


def strip_png(width: int, height: int) -> bytes:
    """A one-colour PNG one pixel high or wide: 140 bytes (20000x1) to 13 KB (1x20000: a filter byte per
    row) on the wire, width x height pixels decoded."""
    return encode(np.full((height, width, 3), 120, np.uint8), "png")


GOOD = encode(photo("china", (320, 240)), "jpeg", quality=90)
BMP_2M = bmp_strip(2_000_000)  # 6 MB, 2 MP: within every limit; OpenCV refuses a side over 2**20


@pytest.fixture(scope="module")
def service(scored_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    svc = ServiceProcess(scored_model_dir, tmp_path_factory.mktemp("image_cost"))
    svc.model = scored_model_dir.name  # a served export is named after its directory
    try:
        yield svc
    finally:
        svc.stop()


def _group_pids(leader: int) -> List[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == leader:
                    pids.append(int(entry.name))
            except ProcessLookupError:
                pass
    return pids


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def peak_growth_mb(svc: ServiceProcess, send) -> float:
    """MB by which ``send()`` raised the peak resident size of rexnet-serve's processes, summed."""
    pids = _group_pids(svc.proc.pid)
    before = {}
    for pid in pids:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS
        before[pid] = _status_kb(pid, "VmRSS")
    send()
    return sum(max(0, _status_kb(pid, "VmHWM") - rss) for pid, rss in before.items()) / 1024


def pipeline_http(svc: ServiceProcess, images: List[bytes]) -> Dict:
    body = {"key": pipeline_wire.image_keys(len(images)),
            "value": [base64.b64encode(data).decode("ascii") for data in images]}
    reply = requests.post(svc.url, json=body, timeout=300)
    assert reply.status_code == 200, reply.text[:500]
    return reply.json()


def v2_rest(svc: ServiceProcess, images: List[bytes]) -> requests.Response:
    """An infer request with encoded images, on the one export served (named after its directory)."""
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [len(images)],
                        "data": [base64.b64encode(data).decode("ascii") for data in images]}],
            "outputs": [{"name": "probs"}, {"name": "errors"}]}
    return requests.post(f"http://127.0.0.1:{svc.oip_http}/v2/models/{svc.model}/infer", json=body, timeout=300)


def v2_errors(reply: requests.Response) -> List[str]:
    assert reply.status_code == 200, reply.text[:500]
    (errors,) = [o for o in reply.json()["outputs"] if o["name"] == "errors"]
    return [json.loads(e)["code"] if e else "" for e in errors["data"]]


def pipeline_codes(answer: Dict) -> List[str]:
    assert answer["err_no"] == 0, answer
    return [r.error_code or "" for r in pipeline_wire.decode_results(answer["value"][0])]


@pytest.mark.parametrize("size", [(20000, 1), (1, 20000)], ids=["20000x1", "1x20000"])
@pytest.mark.parametrize("door", ["pipeline_http", "v2_rest"])
def test_a_strip_of_pixels_costs_the_service_little(service, door, size):
    """A few hundred bytes of PNG, 20,000 pixels: classified, and the resize never holds more than the crop
    needs (main's code resized the whole image first: +4 GB for 20000x1)."""
    png = strip_png(*size)
    for _ in range(2):  # the steady state: buffers and Paddle's memory pool at their size for one image
        pipeline_http(service, [GOOD])
    outcome = {}
    if door == "pipeline_http":
        growth = peak_growth_mb(service, lambda: outcome.update(codes=pipeline_codes(pipeline_http(service, [png]))))
    else:
        growth = peak_growth_mb(service, lambda: outcome.update(codes=v2_errors(v2_rest(service, [png]))))
    print(f"\n{door}: a {size[0]}x{size[1]} PNG of {len(png)} bytes: peak RSS +{growth:.0f} MB")
    assert outcome["codes"] == [""]
    assert growth < REQUEST_MEMORY_BUDGET_MB / 4


def test_decoder_refusal_is_the_images_error_over_pipeline_http(service):
    codes = pipeline_codes(pipeline_http(service, [GOOD, BMP_2M, GOOD]))
    assert codes == ["", "not_an_image", ""]
    only_bad = pipeline_http(service, [BMP_2M])
    assert only_bad["err_no"] == pipeline_wire.INVALID_IMAGE and "not_an_image" in only_bad["err_msg"]


def test_decoder_refusal_is_the_images_error_over_v2_rest(service):
    assert v2_errors(v2_rest(service, [GOOD, BMP_2M])) == ["", "not_an_image"]
    only_bad = v2_rest(service, [BMP_2M])
    assert only_bad.status_code == 400 and "not_an_image" in only_bad.json()["error"]


def test_decoder_refusal_is_the_images_error_on_the_brpc_image_feed(scored_model_dir):
    from rexnet_serving.brpc.service import ModelService
    from rexnet_serving.brpc.tensors import ElemType, Request, Tensor
    from rexnet_serving.results import ImageResult
    service = ModelService(scored_model_dir, cpu_threads=1)
    request = Request(tensor=[Tensor(alias_name="image", name="image", elem_type=ElemType.UINT8,
                                     shape=[len(data)], tensor_content=data) for data in (GOOD, BMP_2M)],
                      fetch_var_names=["predictions"])
    (output,) = service(request).outputs
    results = [ImageResult.from_dict(json.loads(doc)) for doc in output.tensor[0].data]
    assert results[0].ok and results[1].error_code == "not_an_image"


def test_rexnet_predict_records_the_decoder_refusal_and_goes_on(scored_model_dir, tmp_path):
    from rexnet_serving import predict_cli
    images = tmp_path / "images"
    images.mkdir()
    (images / "a_good.jpg").write_bytes(GOOD)
    (images / "b_wide.bmp").write_bytes(BMP_2M)
    (images / "c_strip.png").write_bytes(strip_png(20000, 1))
    out = tmp_path / "out.jsonl"
    assert predict_cli.main([str(images), "-m", str(scored_model_dir), "-o", str(out), "--no-progress"]) == 1
    records = {Path(r["path"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert records["a_good.jpg"]["ok"] and records["c_strip.png"]["ok"]
    assert records["b_wide.bmp"]["error"]["code"] == "not_an_image"
