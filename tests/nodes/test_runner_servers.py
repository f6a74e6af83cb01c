"""``python -m antipure run --server URL ...`` against two real ComfyUI servers on loopback.

The servers (``main.py --cpu`` on free ports, this pack linked into their
``custom_nodes/``) are started once for the module and stopped at its end; a
test kills one. The graph is cheap and needs no checkpoint: load image ->
AntiPure Purify (seeded Gaussian noise) -> save, plus the image width shown as
text (GetImageSize -> Preview Any) and a STRING output (StringConcatenate).
The shipped stress test (every lane, DreamBooth included) then runs on the
survivor with the demo's random-weight checkpoints and tiny settings.
"""
from __future__ import annotations

import asyncio
import csv
import json
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import nodes

from antipure import cli, errors
from antipure.comfyui import ServerProcess, free_port
from antipure.remote import run_remote
from tests.nodes.host import PACK_DIR, running_servers
from tests.nodes.test_workflow_tools import UIGraph, write_image

COMFY_ROOT = Path(nodes.__file__).parent
SETS = ["Noise.method=gaussian_noise", "Noise.seed=7", "Noise.noise_sigma=0.2"]
SETS_ARGS = [arg for item in SETS for arg in ("--set", item)]


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two running ComfyUI servers: list of :class:`ServerProcess` (ready)."""
    with running_servers(COMFY_ROOT, [tmp_path_factory.mktemp(f"server{i}") for i in range(2)]) as procs:
        yield procs


def noise_workflow() -> dict:
    g = UIGraph()
    load = g.node("LoadImage", ["example.png", "image"], outputs=["IMAGE", "MASK"])
    noise = g.node("AntiPurePurify", None, inputs=[("image", "IMAGE")], outputs=["IMAGE"], title="Noise")
    save = g.node("SaveImage", ["noisy"], inputs=[("images", "IMAGE")])
    size = g.node("GetImageSize", inputs=[("image", "IMAGE")], outputs=["INT", "INT", "INT"])
    width = g.node("PreviewAny", inputs=[("source", "*")], title="Width")
    label = g.node("StringConcatenate", ["size", "ok", "-"], outputs=["STRING"], title="Label")
    shown = g.node("PreviewAny", inputs=[("source", "*")], title="Shown")
    g.wire((load, 0, noise, "image"), (noise, 0, save, "images"), (load, 0, size, "image"),
           (size, 0, width, "source"), (label, 0, shown, "source"))
    return g.json()


@pytest.fixture
def batch(tmp_path):
    """(workflow path, images folder with n images of distinct widths)."""
    (tmp_path / "wf.json").write_text(json.dumps(noise_workflow()))
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        write_image(folder / f"im{i}.png", 32 + 8 * i, 32, 20 * i)
    return tmp_path / "wf.json", folder


def rows(out: Path) -> list[dict]:
    with open(out / "results.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def remote(workflow, images, out, servers, **kw):
    from antipure.prompts import list_images

    return asyncio.run(run_remote(workflow, list_images(images), out, [s.url for s in servers], sets=SETS,
                                  progress=False, **kw))


def add_bad_images(folder: Path) -> dict[str, str]:
    """Files the host's loader would accept or mangle but the runner refuses: name -> start of the reason."""
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "im3_cut.png")
    whole = (folder / "im3_cut.png").read_bytes()
    (folder / "im3_cut.png").write_bytes(whole[: len(whole) // 3])  # its first third, between two good ones
    (folder / "empty.png").write_bytes(b"")
    (folder / "broken.png").write_bytes(b"not a png")
    Image.new("RGB", (32, 32)).save(folder / "jpeg_named.png", "JPEG")
    Image.fromarray(np.full((32, 32), 40000, np.uint16)).save(folder / "grey16.png")
    return {"im3_cut.png": "im3_cut.png: truncated or corrupt image data",
            "empty.png": "empty.png: empty file (0 bytes)",
            "broken.png": "broken.png: not an image Pillow can read",
            "jpeg_named.png": "jpeg_named.png: the file holds JPEG data but is named .png",
            "grey16.png": "grey16.png: unsupported mode I;16"}


def test_a_folder_is_sharded_over_both_servers_like_the_in_process_run(servers, batch, tmp_path):
    workflow, images = batch
    bad = add_bad_images(images)  # refused before upload: own rows, never started, the others go on
    events = []
    results = remote(workflow, images, tmp_path / "remote", servers, on_event=lambda *e: events.append(e))
    by_image = {r.image: r for r in results}
    for name, reason in bad.items():
        assert by_image[name].status == "invalid" and by_image[name].error.startswith(reason), by_image[name]
    assert not {e[2].name for e in events if e[0] == "start"} & set(bad)
    ran_on = Counter(e[1] for e in events if e[0] == "done")
    assert set(ran_on) == {s.url for s in servers}  # both servers did work

    code = cli.main(["run", str(workflow), "--images", str(images), "--out", str(tmp_path / "local"), "--no-progress",
                     "--comfyui", str(COMFY_ROOT), *SETS_ARGS])
    assert code == errors.EXIT_FAILED  # some images failed
    local = rows(tmp_path / "local")
    far = rows(tmp_path / "remote")
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in local]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in far]  # the same table
    assert {r["image"] for r in local if r["status"] == "invalid"} == set(bad)
    assert not any((tmp_path / out / Path(name).stem).exists() for name in bad for out in ("local", "remote"))
    local = [r for r in local if r["image"] not in bad]
    assert [r["input"] for r in local] == [f"PNG RGB {32 + 8 * i}x32 8-bit" for i in range(8)]
    assert [r["Width.text"] for r in local] == [str(32 + 8 * i) for i in range(8)]
    assert {r["Label.STRING"] for r in local} == {"size-ok"}
    for r in local:
        assert r["status"] == "ok" and r["outputs"] == f"{Path(r['image']).stem}/noisy_00001_.png"
        a = np.asarray(Image.open(tmp_path / "local" / r["outputs"]))
        b = np.asarray(Image.open(tmp_path / "remote" / r["outputs"]))
        assert np.array_equal(a, b)  # same seed, same noise, whichever machine ran it
        assert a.std() > 5  # the noise is there
    assert not (tmp_path / "remote" / ".partial").exists()
    # in-process --resume: everything is done, nothing is run or rewritten
    for name in bad:
        (images / name).unlink()
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "local").rglob("*")}
    assert cli.main(["run", str(workflow), "--images", str(images), "--out", str(tmp_path / "local"),
                     "--no-progress", "--comfyui", str(COMFY_ROOT), "--resume", *SETS_ARGS]) == errors.EXIT_OK
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "local").rglob("*")} == before


def test_resume_after_an_interrupted_run_redoes_only_what_is_missing(servers, batch, tmp_path):
    workflow, images = batch
    out = tmp_path / "out"

    class Stop(Exception):
        pass

    def stop_after_three(event, server, image, data):
        if event == "done" and sum(1 for _ in rows(out)) == 3:
            raise Stop  # the run dies here, with the other server's job in flight

    with pytest.raises(Stop):
        remote(workflow, images, out, servers, on_event=stop_after_three)
    first = rows(out)
    assert len(first) == 3 and all(r["status"] == "ok" for r in first)
    kept = {r["image"]: (out / r["outputs"]).stat().st_mtime_ns for r in first}
    missing = sorted({p.name for p in images.iterdir()} - set(kept))
    # what a killed run leaves: a staging folder, and a partial output of an unfinished image
    (out / ".partial" / "dead").mkdir(parents=True, exist_ok=True)
    (out / ".partial" / "dead" / "x.png").write_bytes(b"partial")
    partial = out / Path(missing[0]).stem / "noisy_00001_.png"
    partial.parent.mkdir(exist_ok=True)
    partial.write_bytes(b"half a file")

    redone = remote(workflow, images, out, servers, resume=True)
    assert sorted(r.image for r in redone) == missing
    final = rows(out)
    assert sorted(r["image"] for r in final) == sorted(p.name for p in images.iterdir())
    assert all(r["status"] == "ok" for r in final)
    assert {r["image"]: (out / r["outputs"]).stat().st_mtime_ns for r in final if r["image"] in kept} == kept
    assert Image.open(partial).size == (32 + 8 * int(Path(missing[0]).stem[2:]), 32)  # redone, whole
    assert not (out / ".partial").exists()
    assert remote(workflow, images, out, servers, resume=True) == []  # nothing left to do


def test_an_unreachable_server_is_a_clear_error(servers, batch, tmp_path, capsys):
    workflow, images = batch
    url = f"http://127.0.0.1:{free_port()}"  # nobody listens there
    code = cli.main(["run", str(workflow), "--images", str(images), "--out", str(tmp_path / "out"),
                     "--server", servers[0].url, "--server", url, "--no-progress"])
    err = capsys.readouterr().err
    assert code == errors.EXIT_NO_HOST
    assert f"--server not reachable: {url}" in err and servers[0].url not in err
    assert not (tmp_path / "out").exists()


def test_a_server_killed_mid_run_loses_no_image(servers, batch, tmp_path):
    workflow, images = batch
    victim = servers[0]
    done_on = Counter()
    killed, events = [], []

    def kill_on_second_job(event, server, image, data):
        events.append((event, server, image))
        if event == "done":
            done_on[server] += 1
        # the victim has finished a job and takes another: it dies with that job in its hands
        if event == "start" and server == victim.url and done_on[server] >= 1 and not killed:
            victim.stop(kill=True)
            killed.append(image.name)

    results = remote(workflow, images, tmp_path / "out", servers, on_event=kill_on_second_job)
    assert killed, "the victim server never took a second job"
    assert all(r.status == "ok" for r in results) and len(results) == 8
    table = rows(tmp_path / "out")
    assert Counter(r["image"] for r in table) == Counter(p.name for p in images.iterdir())  # each exactly once
    for r in table:
        assert r["status"] == "ok" and (tmp_path / "out" / r["outputs"]).is_file()
    lost = [(e, s) for e, s, im in events if im is not None and im.name == killed[0]]
    assert lost[:2] == [("start", victim.url), ("retry", victim.url)]
    assert lost[-1] == ("done", servers[1].url)  # re-queued on the survivor
    assert ("server_down", victim.url) in [(e, s) for e, s, _ in events]  # checked, never back: no more work


#: tiny settings for the stress test: one 64-px image, 32-px samples, every lane two or three steps
STRESS_SETS = [
    "Protect.steps=2", "Latent.width=32", "Latent.height=32", "Latent.batch_size=1",
    *[f"{p} LoRA.steps=3" for p in ("DiffPure", "GrIDPure", "JPEG")],
    *[f"{p} sample.steps=2" for p in ("DiffPure", "GrIDPure", "JPEG", "DreamBooth")],
    "DreamBooth model.steps=2", "DreamBooth model.class_image_count=1", "DreamBooth model.class_sampling_steps=2",
    # the method the stress test's note offers: the SD model attacked through the pixel purifier (the in-process
    # run of this workflow in test_workflows.py keeps antipure)
    "Protect.method=purified_advdm",
]


def test_the_stress_test_with_purified_advdm_and_its_dreambooth_lane_runs_on_a_server(servers, tmp_path):
    # the shipped stress test queued through the runner on a real server, with the demo's random-weight
    # checkpoints (the plain host detects them: no test-only registration in the server process)
    from antipure.demo import DEMO_SETTINGS, SAMPLE
    from antipure.random_checkpoint import save_checkpoint
    from antipure.random_pixel import save_random_adm

    server = servers[1]  # the survivor of the kill test above: this test's run cannot change that one's timing
    models = server.base / "models"
    ckpt = next(s.split("=", 1)[1] for s in DEMO_SETTINGS if s.startswith("Checkpoint.ckpt_name="))
    pixel = next(s.split("=", 1)[1] for s in DEMO_SETTINGS if s.startswith("Purifier.ckpt_name="))
    save_checkpoint(models / "checkpoints" / ckpt, "demo")
    save_random_adm(models / "pixel_diffusion" / pixel)
    images = tmp_path / "images"
    images.mkdir()
    Image.open(SAMPLE).convert("RGB").resize((64, 64), Image.LANCZOS).save(images / "face.png")  # one window
    sets = [arg for item in DEMO_SETTINGS + STRESS_SETS for arg in ("--set", item)]
    workflow = PACK_DIR / "example_workflows" / "antipure_stress_test.json"
    code = cli.main(["run", str(workflow), "--images", str(images), "--out", str(tmp_path / "out"),
                     "--server", server.url, "--no-progress", *sets])
    table = rows(tmp_path / "out")
    # one row per lane, the DreamBooth lane's scores in its own row
    assert code == errors.EXIT_OK and [(r["lane"], r["status"]) for r in table] == [
        (f"antipure+{lane}", "ok") for lane in ("diffpure", "gridpure", "gridpure+dreambooth", "jpeg")], table
    row = next(r for r in table if r["lane"] == "antipure+gridpure+dreambooth")
    assert "(dreambooth)" in row["DreamBooth model.text"] and "text encoder" in row["DreamBooth model.text"]
    assert row["generated/grid_score"] and row["purified/psnr"] == table[1]["purified/psnr"], row  # GrIDPure images
    assert "Customized" in row["GrIDPure LoRA.text"] and "(dreambooth)" not in row["GrIDPure LoRA.text"]
    written = {p.name for p in (tmp_path / "out").rglob("*")}
    assert any("comparison_dreambooth" in n and n.endswith(".png") for n in written), written


HIDE_REQUESTS = textwrap.dedent("""
    import importlib.abc, runpy, sys

    class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "requests" or name.startswith("requests."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Hide())
    sys.argv = ["antipure", *sys.argv[1:]]
    runpy.run_module("antipure", run_name="__main__", alter_sys=True)
""")


@pytest.mark.parametrize("command", ["demo", "run"])
def test_a_missing_host_module_is_one_line_with_the_install_command(command, batch, tmp_path):
    workflow, images = batch
    args = (["demo", "--out", str(tmp_path / "demo")] if command == "demo"
            else ["run", str(workflow), "--images", str(images), "--out", str(tmp_path / "out")])
    env = {**os.environ, "COMFYUI_PATH": str(COMFY_ROOT)}
    proc = subprocess.run([sys.executable, "-c", HIDE_REQUESTS, *args], cwd=PACK_DIR, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == errors.EXIT_NO_HOST, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "'requests'" in lines[0] and "-m pip install requests" in lines[0]
