"""One workflow over a folder of images, sharded over running ComfyUI servers through their own API.

For each image, on the server the :class:`~antipure.scheduler.Scheduler` picks:
``POST /upload/image`` (into ``input/antipure/<token>/``), ``POST /prompt`` with
the image set and every ``filename_prefix`` moved under
``antipure/<token>/<image stem>/`` (so the server's file counters start at
00001 and attempts never mix), the websocket ``/ws?clientId=`` for ``progress``
and the end (``execution_success`` / ``execution_error`` /
``execution_interrupted``), ``GET /history/<prompt_id>`` for what the nodes
saved and showed, ``GET /view`` for each output file. Files are downloaded into
``OUT/.partial/<token>/``; only the image's first finished run is renamed into
``OUT/<image stem>/`` and gets its row in ``results.csv`` (:mod:`antipure.results`).

STRING outputs, which the server's history does not hold, are read through a
``PreviewAny`` node added for every STRING output of a node that runs anyway,
so ``results.csv`` has the same columns as an in-process run.

Connection errors, HTTP 5xx, a closed websocket and an interrupted prompt are
:class:`~antipure.scheduler.ServerGone` (the image is retried on another
server); a prompt the server rejects (HTTP 400) or a node error is a
:class:`~antipure.scheduler.JobError`, reported in the table.

Liveness: each ``progress``, ``executing`` (and the other execution messages) of
the prompt, each queue ``status`` and each finished HTTP step is reported to the
scheduler, which stalls the job after ``stall_timeout`` seconds without any
(see :mod:`antipure.scheduler`). A stalled run interrupts and deletes its prompt
on the server, each request bounded to a few seconds, since a stopped server
never answers. Nothing of a server is kept across its runs but its URL: a server
restarted on the same address must answer ``/system_stats`` and still have every
node type of the workflow, and is then sent new prompts only.

Node schemas come from the servers' ``/object_info``: no local ComfyUI is needed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Mapping, Sequence

import aiohttp

from .errors import EXIT_BAD_WORKFLOW, EXIT_NO_HOST, RunnerError
from .prompts import prepare_prompt, set_image
from .text_outputs import TextOutputs, collect_text
from .image_check import check_images
from .results import ImageResult, ResultsTable, Staging, refused_inputs, reported_files
from .scheduler import JobError, Scheduler, ServerGone

__all__ = ["ComfyServer", "node_classes", "text_viewers", "run_remote"]

SERVER_FOLDER = "antipure"  # under the server's input/ and output/ folders
_VIEWER = "PreviewAny"
_POLL_SECONDS = 10.0  # without a websocket message for this long, ask /history (a missed event)
_QUICK = aiohttp.ClientTimeout(total=5)  # checks and clean-up: a stopped server must not hold them up
_LIVE = {"executing", "execution_start", "execution_cached", "executed"}  # signs the prompt moves


def node_classes(object_info: Mapping[str, dict]) -> dict[str, type]:
    """Stand-ins for the node classes of a server, built from its ``GET /object_info``: what
    :mod:`antipure.workflow_format` and :mod:`antipure.prompts` read (``INPUT_TYPES()``,
    ``RETURN_TYPES``, ``RETURN_NAMES``, ``OUTPUT_NODE``)."""
    classes = {}
    for name, info in object_info.items():
        inputs = info.get("input") or {}
        classes[name] = type(name, (), {
            "INPUT_TYPES": staticmethod(lambda inputs=inputs: inputs),
            "RETURN_TYPES": tuple(info.get("output") or ()),
            "RETURN_NAMES": tuple(info.get("output_name") or info.get("output") or ()),
            "OUTPUT_NODE": bool(info.get("output_node")),
            "DISPLAY_NAME": info.get("display_name") or name,
        })
    return classes


def _executed_nodes(prompt: Mapping[str, dict], classes: Mapping[str, type]) -> set[str]:
    """The output nodes and everything they depend on: the nodes a run executes."""
    todo = [nid for nid, node in prompt.items() if getattr(classes[node["class_type"]], "OUTPUT_NODE", False)]
    seen: set[str] = set()
    while todo:
        nid = todo.pop()
        if nid in seen or nid not in prompt:
            continue
        seen.add(nid)
        todo += [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list) and len(v) == 2]
    return seen


def text_viewers(prompt: Mapping[str, dict], classes: Mapping[str, type]) -> dict[str, tuple[str, int]]:
    """``PreviewAny`` nodes to add so the server reports every STRING output of the nodes that run:
    viewer node id -> (node id, output slot). Empty when the server has no ``PreviewAny``."""
    if _VIEWER not in classes:
        return {}
    viewers = {}
    for nid in sorted(_executed_nodes(prompt, classes), key=list(prompt).index):
        for slot, type_ in enumerate(getattr(classes[prompt[nid]["class_type"]], "RETURN_TYPES", ())):
            if type_ == "STRING":
                viewers[f"antipure-text-{nid}-{slot}"] = (nid, slot)
    return viewers


def _validation_message(answer: Any) -> str:
    """The readable part of a ``/prompt`` 400 answer: one ``node X (class): details`` per error."""
    if not isinstance(answer, dict):
        return str(answer)[:500]
    problems = []
    for node_id, info in (answer.get("node_errors") or {}).items():
        for err in info.get("errors", []):
            problems.append(f"node {node_id} ({info.get('class_type', '?')}): "
                            f"{err.get('details') or err.get('message', '')}")
    error = answer.get("error")
    if not problems and error:
        problems.append(f"{error.get('message', '')} {error.get('details', '')}".strip()
                        if isinstance(error, dict) else str(error))
    return "; ".join(problems) or "the server rejected the prompt"


class ComfyServer:
    """A running ComfyUI server as a :class:`~antipure.scheduler.Transport` for one batch.

    Args:
        url: base URL, e.g. ``http://127.0.0.1:8188``.
        session: the aiohttp session to use.
        batch: the batch's prompt, image input, classes, text viewers and output folder.
    """

    def __init__(self, url: str, session: aiohttp.ClientSession, batch: "RemoteBatch | None" = None):
        self.name = url.rstrip("/")
        self.session = session
        self.batch = batch

    async def _request(self, method: str, path: str, raw: bool = False, **kw) -> tuple[int, Any]:
        """(HTTP status, JSON answer, or the bytes with ``raw``); connection problems and 5xx are
        :class:`ServerGone`."""
        try:
            async with self.session.request(method, self.name + path, **kw) as r:
                body = await r.read()
                if r.status >= 500:
                    raise ServerGone(f"HTTP {r.status} from {method} {path}: {body[:300].decode(errors='replace')}")
                if not raw and r.content_type == "application/json":
                    return r.status, json.loads(body)
                return r.status, body
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ServerGone(f"{method} {path}: {type(e).__name__}: {e}") from None

    async def check(self) -> None:
        """The server answers; with a batch, it also has every node type of the batch's prompt (a
        server restarted on the same address may come back with other custom nodes)."""
        status, _ = await self._request("GET", "/system_stats", timeout=_QUICK)
        if status != 200:
            raise ServerGone(f"GET /system_stats answered HTTP {status}")
        if self.batch is not None:
            lacking = sorted({n["class_type"] for n in self.batch.prompt.values()} - set(await self.object_info()))
            if lacking:
                raise ServerGone(f"it answers but has no node type {', '.join(lacking)}")

    async def object_info(self) -> dict:
        status, info = await self._request("GET", "/object_info")
        if status != 200 or not isinstance(info, dict):
            raise ServerGone(f"GET /object_info answered HTTP {status}")
        return info

    async def run(self, image: Path, report: Callable[[str, dict], None]) -> "Staged":
        """Run the batch's prompt on one image; its files stay staged until :meth:`Staged.commit`."""
        staging = Staging(self.batch.out, image.stem)
        try:
            return await self._run(image, staging, report)
        except BaseException:  # failed, or stopped because it stalled: nothing of it stays
            staging.discard()
            raise

    async def _run(self, image: Path, staging: Staging, report: Callable[[str, dict], None]) -> "Staged":
        t0 = time.perf_counter()
        name = await self._upload(image, staging)
        report("alive", {})
        prompt = set_image(self.batch.prompt, self.batch.image_input, name, staging.prefix_folder(SERVER_FOLDER))
        outputs = await self._execute(prompt, report)
        files = []
        for sub, filename in reported_files({k: v for k, v in outputs.items() if k not in self.batch.viewers}):
            files.append(await self._download(sub, filename, image, staging))
            report("alive", {})
        result = ImageResult(image=image.name, seconds=round(time.perf_counter() - t0, 3))
        result.text = staging.published(self._text(prompt, outputs), SERVER_FOLDER)
        return Staged(result, staging, files + staging.write_reports(result.text.reports))

    async def _upload(self, image: Path, staging: Staging) -> str:
        """Upload into ``input/antipure/<token>/``; returns the value for the image input."""
        form = aiohttp.FormData()
        form.add_field("image", image.read_bytes(), filename=image.name)
        form.add_field("subfolder", f"{SERVER_FOLDER}/{staging.token}")
        form.add_field("type", "input")
        status, up = await self._request("POST", "/upload/image", data=form)
        if status != 200 or not isinstance(up, dict):
            raise JobError(f"{self.name} refused the upload of {image.name}: HTTP {status}", "invalid")
        return f"{up['subfolder']}/{up['name']}" if up.get("subfolder") else up["name"]

    async def _execute(self, prompt: dict, report: Callable[[str, dict], None]) -> dict:
        """Queue ``prompt`` (plus the text viewers) and wait for it; returns its history ``outputs``."""
        sent = dict(prompt)
        for vid, (nid, slot) in self.batch.viewers.items():
            sent[vid] = {"class_type": _VIEWER, "inputs": {"source": [nid, slot]}}
        client_id = uuid.uuid4().hex
        try:  # connected before queueing, so no event is missed
            ws = await self.session.ws_connect(f"{self.name}/ws?clientId={client_id}", heartbeat=30,
                                               timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5))
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ServerGone(f"websocket: {type(e).__name__}: {e}") from None
        try:
            status, answer = await self._request("POST", "/prompt", json={"prompt": sent, "client_id": client_id})
            if status == 400:
                raise JobError(_validation_message(answer), "invalid")
            if status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
                raise ServerGone(f"POST /prompt answered HTTP {status}: {str(answer)[:300]}")
            report("alive", {})
            try:
                entry = await self._wait(ws, answer["prompt_id"], report)
            except asyncio.CancelledError:  # stalled: do not let it run on there
                await self._stop(answer["prompt_id"])
                raise
        finally:
            await ws.close()
        return entry.get("outputs") or {}

    async def _stop(self, prompt_id: str) -> None:
        """Interrupt the prompt if it runs and delete it from the queue if it waits, when the server
        answers within a few seconds; a stopped server is left alone."""
        for path, body in (("/interrupt", {"prompt_id": prompt_id}), ("/queue", {"delete": [prompt_id]})):
            try:
                await self._request("POST", path, json=body, timeout=_QUICK)
            except ServerGone:
                return

    async def _download(self, sub: str, filename: str, image: Path, staging: Staging) -> str:
        """Fetch one output file into the staging folder; returns its path relative to OUT."""
        # a file saved outside the prefix folder (a node that ignores filename_prefix) joins the image's
        local = (staging.local_name(sub, filename, SERVER_FOLDER)
                 or PurePosixPath(image.stem, sub.replace("\\", "/"), filename).as_posix())
        status, data = await self._request("GET", "/view", raw=True,
                                           params={"filename": filename, "subfolder": sub, "type": "output"})
        if status != 200:
            raise ServerGone(f"GET /view {sub}/{filename} answered HTTP {status}")
        target = staging.root / local
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        return local

    def _text(self, prompt: Mapping[str, dict], outputs: Mapping[str, dict]) -> TextOutputs:
        """The run's text (:mod:`antipure.text_outputs`), from the viewers' and the nodes' own UI text."""
        values: dict[str, list] = {}
        for vid, (nid, slot) in self.batch.viewers.items():
            text = (outputs.get(vid) or {}).get("text")
            if text is not None:
                values.setdefault(nid, [])
                values[nid] += [None] * (slot + 1 - len(values[nid]))
                values[nid][slot] = list(text)
        return collect_text(prompt, self.batch.classes, values, {nid: outputs.get(nid) or {} for nid in prompt})

    async def _wait(self, ws: aiohttp.ClientWebSocketResponse, prompt_id: str,
                    report: Callable[[str, dict], None]) -> dict:
        """The prompt's ``/history`` entry once it finished; progress events go to ``report``."""
        while True:
            try:
                msg = await ws.receive(timeout=_POLL_SECONDS)
            except asyncio.TimeoutError:
                msg = None
            if msg is not None and msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED,
                                                aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.ERROR):
                raise ServerGone(f"the websocket closed while prompt {prompt_id} ran")
            if msg is not None and msg.type == aiohttp.WSMsgType.TEXT:
                event = json.loads(msg.data)
                data = event.get("data") or {}
                kind = event.get("type")
                if kind == "status":
                    report("alive", {})  # the queue changed
                if data.get("prompt_id") != prompt_id:
                    continue  # another prompt's (an earlier run's on a restarted server included)
                if kind in _LIVE:
                    report("alive", {})
                if kind == "progress":
                    report("progress", {"value": data.get("value"), "max": data.get("max"),
                                        "node": data.get("node")})
                    continue
                if kind == "execution_error":
                    raise JobError(f"node {data.get('node_id')} ({data.get('node_type')}): "
                                   f"{data.get('exception_type', '')}: {data.get('exception_message', '')}".strip())
                if kind == "execution_interrupted":
                    raise ServerGone(f"prompt {prompt_id} was interrupted on the server")
                if kind not in ("execution_success", "executing") or (kind == "executing" and data.get("node")):
                    continue
                entry = await self._history(prompt_id, wait=True)  # the server writes it just after
            elif msg is not None:
                continue  # binary previews
            else:
                entry = await self._history(prompt_id, wait=False)  # a quiet spell: did we miss the end?
            if entry is not None:
                return entry

    async def _history(self, prompt_id: str, wait: bool) -> dict | None:
        """The finished prompt's ``/history`` entry (``None`` while it runs; with ``wait``, poll up to
        a minute for it); a run that ended in an error is a :class:`JobError`."""
        delay = 0.05
        for _ in range(40 if wait else 1):
            status, history = await self._request("GET", f"/history/{prompt_id}")
            entry = history.get(prompt_id) if status == 200 and isinstance(history, dict) else None
            state = (entry or {}).get("status") or {}
            if state.get("status_str") == "error":
                errors = [m[1] for m in state.get("messages", []) if m and m[0] == "execution_error"]
                e = errors[0] if errors else {}
                raise JobError(f"node {e.get('node_id')} ({e.get('node_type')}): "
                               f"{e.get('exception_type', '')}: {e.get('exception_message', '')}".strip())
            if entry is not None and state.get("completed", True):
                return entry
            if wait:
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
        if wait:
            raise ServerGone(f"prompt {prompt_id} finished but /history has no entry for it")
        return None


class Staged:
    """One finished run of one image, its files still in ``OUT/.partial/``: the first run of an image
    to finish is committed, a later one (a re-queued image finished twice) discarded."""

    def __init__(self, result: ImageResult, staging: Staging, files: list[str]):
        self.result, self.staging, self.files = result, staging, files

    def commit(self) -> ImageResult:
        self.result.outputs = self.staging.commit(self.files)
        return self.result

    def discard(self) -> None:
        self.staging.discard()


class RemoteBatch:
    """What every server needs to run one image: prompt, image input, schemas, viewers, OUT."""

    def __init__(self, prompt: dict, image_input: tuple[str, str], classes: Mapping[str, type], out: Path):
        self.prompt, self.image_input, self.classes, self.out = prompt, image_input, classes, out
        self.viewers = text_viewers(prompt, classes)


def _normalise(url: str) -> str:
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"


async def _connect(servers: Sequence[ComfyServer]) -> list[dict]:
    """Each server's ``/object_info``; an unreachable server stops the run (exit 2)."""
    async def probe(server: ComfyServer):
        try:
            await server.check()
            return await server.object_info()
        except ServerGone as e:
            return e
    answers = await asyncio.gather(*(probe(s) for s in servers))
    down = [f"{s.name} ({a})" for s, a in zip(servers, answers) if isinstance(a, Exception)]
    if down:
        raise RunnerError(EXIT_NO_HOST, "--server not reachable: " + "; ".join(down) + ". Start ComfyUI there "
                          "(python main.py --listen 0.0.0.0 --port PORT) or leave that --server out.")
    return answers


async def run_remote(workflow: Path, images: Sequence[Path], out: Path, urls: Sequence[str], sets=(),
                     image_node: str | None = None, per_server: int = 1, attempts: int = 3, resume: bool = False,
                     stall_timeout: float | None = 300.0, down_timeout: float = 300.0, progress: bool = True,
                     on_event: Callable[[str, str | None, Any, dict], None] | None = None) -> list[ImageResult]:
    """Run ``workflow`` once per image over the ComfyUI servers at ``urls``; writes ``out/results.csv``.

    Args:
        per_server: jobs in flight on each server.
        attempts: tries per image when servers fail (see :class:`~antipure.scheduler.Scheduler`).
        resume: skip images ``out/results.csv`` lists as ok.
        stall_timeout: seconds without progress, a node starting or a queue change before an image is
            stopped on its server and re-queued (``None``: wait for ever); longer than the slowest
            silent step of the workflow (a model load).
        down_timeout: seconds a server that stopped answering is checked for before it is given up.
        on_event: also called with every scheduler event (after the results are recorded).

    Returns:
        The results of the images run now, in image order; an image that does not decode completely
        (:mod:`antipure.image_check`) has an ``invalid`` row and is not sent.

    Raises:
        RunnerError: a server is unreachable (exit 2), the workflow is invalid or uses a node
            type a server lacks (exit 3).
    """
    from tqdm.auto import tqdm

    out = Path(out).resolve()
    urls = list(dict.fromkeys(_normalise(u) for u in urls))
    timeout = aiohttp.ClientTimeout(total=None, connect=10, sock_connect=10, sock_read=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        servers = [ComfyServer(u, session) for u in urls]
        infos = await _connect(servers)
        classes = node_classes(infos[0])
        display = {name: cls.DISPLAY_NAME for name, cls in classes.items()}
        prompt, image_input = prepare_prompt(workflow, classes, display, sets, image_node)
        for server, info in zip(servers, infos):
            lacking = sorted({n["class_type"] for n in prompt.values()} - set(info))
            if lacking:
                raise RunnerError(EXIT_BAD_WORKFLOW, f"--server {server.name} has no node type {', '.join(lacking)}:"
                                                     " install the same custom nodes on every server")
        batch = RemoteBatch(prompt, image_input, classes, out)
        for server in servers:
            server.batch = batch
        table = ResultsTable(out, resume=resume)
        todo = [im for im in images if im.name not in table.finished()]
        table.clear_unfinished(im.stem for im in todo)  # a killed run's half-committed outputs
        described, bad = check_images(todo)  # a file that does not decode completely is never uploaded
        results: dict[str, ImageResult] = {}
        for res in refused_inputs(bad):
            table.add(res)
            results[res.image] = res
            print(f"{res.image}: invalid: {res.error}", file=sys.stderr)
        bar = tqdm(total=len(described), desc="images", unit="img", disable=None if progress else True)
        steps: dict[str, str] = {}

        def record(event: str, server: str | None, image: Any, data: dict) -> None:
            if event == "done":
                data["result"] = data["result"].commit()  # the image's first finished run: into OUT
            if event in ("done", "failed"):
                res = data["result"] if event == "done" else ImageResult(image.name, status=data["status"],
                                                                         error=data["error"])
                res.input = described[image]
                table.add(res)
                results[image.name] = res
                bar.update(1)
                if res.status != "ok":
                    tqdm.write(f"{image.name}: {res.status}: {res.error}", file=sys.stderr)
            elif event == "progress" and data.get("max"):
                steps[server] = f"{image.stem} {data['value']}/{data['max']}"
                bar.set_postfix_str(" | ".join(f"{s.split('//')[-1]}: {v}" for s, v in steps.items())[:80])
            elif event == "duplicate":
                data["result"].discard()
                tqdm.write(f"{image.name}: a second run finished on {server} after the first; its outputs "
                           "were discarded", file=sys.stderr)
            elif event == "stalled":
                tqdm.write(f"{image.name}: {server} {data['error']}; stopping it there", file=sys.stderr)
            elif event == "retry":
                tqdm.write(f"{image.name}: {server} failed ({data['error']}); re-queued", file=sys.stderr)
            elif event == "server_back":
                tqdm.write(f"{server} answers again; it gets images again", file=sys.stderr)
            elif event == "server_dropped":
                tqdm.write(f"{server}: {data['reason']}; it gets no more images", file=sys.stderr)
            if on_event is not None:
                on_event(event, server, image, data)

        try:
            await Scheduler(servers, per_server=per_server, attempts=attempts, stall_timeout=stall_timeout,
                            down_timeout=down_timeout, on_event=record).run(described)
        finally:
            bar.close()
    return [results[im.name] for im in todo if im.name in results]

