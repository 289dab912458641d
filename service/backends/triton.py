"""Triton Inference Server over gRPC (``tritonclient.grpc.aio``): the production backend.

The only module that imports tritonclient. One client per process, created in the lifespan; every
call carries a deadline; the channel's reconnect backoff is capped (gRPC's default grows to 120 s,
which would keep the gateway unready long after Triton is back); the model name comes from the
settings, never from a request; model metadata is checked against the contract at start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import aio as grpcaio
from tritonclient.utils import InferenceServerException

from service.backends import (
    BackendTimeout,
    BackendUnavailable,
    Candidates,
    ModelInfo,
    Refresh,
    VersionsState,
    check_contract,
    coco_info,
    version_info,
)
from ssdcore.repository import ModelStore, ModelVersion, RepositoryError
from ssdcore.spec import TENSOR_NAMES

log = logging.getLogger("service.triton")

# No keepalive: it would also set TCP_USER_TIMEOUT, and a hung (not dead) server would then show
# up as a broken connection (503) instead of a request that missed its deadline (504).
CHANNEL_ARGS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    # dns:///NAME:PORT with several addresses (every Triton pod): one request to each in turn
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})),
]
OUTPUTS = (TENSOR_NAMES.boxes, TENSOR_NAMES.scores, TENSOR_NAMES.classes)
LOAD_TIMEOUT_S = 300.0  # loading a model version on a GPU can take minutes


def _status(exc: InferenceServerException) -> str:
    return str(exc.status() or "")


def _version_gone(exc: InferenceServerException) -> bool:
    """Triton's answer to a call naming a version it does not have (unloaded, or never)."""
    message = (exc.message() or "").lower()
    return "version" in message and ("not at ready state" in message or "unknown" in message
                                     or "not found" in message)  # fmt: skip


@dataclass(eq=False)
class TritonPin:
    """The version a request's calls name (``model_version``), with its class list, and how many
    requests hold it (a retired version is unloaded only once none does)."""

    version: str
    info: ModelInfo
    users: int = 0


class TritonBackend:
    """The gateway's side of Triton servers that serve the newest version of one model.

    The model's version policy is ``latest: 2``: the new version and the one before stay loaded
    together. Explicit mode (``--model-control-mode=explicit``): when a new version appears in
    the repository, :meth:`refresh` checks its class list and asks Triton to load the model
    again; a version that fails to load leaves the served one in place. Poll mode (the Helm
    chart): each Triton loads new versions by itself.

    The served version is the highest one READY on every Triton behind the URL (each address
    of a ``dns:///`` or ``ipv4:``/``ipv6:`` URL asked apart), and every call names it
    (``model_version``): while pods poll at different moments, the one before is still loaded
    everywhere, so requests balanced over pods all get one version and a request's batches are
    never answered by two (they used to flip-flop between the pods' versions, and requests of
    several batches failed). Its classes are that version's, read from the repository when the
    version first appears.
    """

    def __init__(
        self,
        url: str,
        model_name: str,
        timeout_s: float,
        repo: Path | None = None,
        model_control: str = "explicit",
    ) -> None:
        self.url = url
        self.model_control = model_control
        self.model_name = model_name
        self.timeout_s = timeout_s
        self.store = ModelStore(Path(repo), model_name) if repo is not None else None
        self.client: grpcaio.InferenceServerClient | None = None
        self.info = ModelInfo(model_name, "", "triton", 0, None)
        self.versions = VersionsState()
        self.topk = 0
        self._infos: dict[str, ModelInfo] = {}
        self._refused: dict[int, tuple[int, int]] = {}  # version -> its stamp when refused
        self._ready_cache: tuple[float, bool] = (0.0, False)
        self._addresses: frozenset | None = None
        self._retired: list[tuple[float, grpcaio.InferenceServerClient]] = []
        self._labelled = False  # the served version's class list is known
        self._pin: TritonPin | None = None  # one object per served version (the batcher's key)
        self._pod_clients: dict[str, grpcaio.InferenceServerClient] = {}
        self._not_ready: dict[str, str] = {}  # version -> Triton's state and reason
        self._stray: set[int] = set()  # READY on Triton, gone from the repository
        self._stamps: dict[str, tuple[int, int]] = {}  # version -> its metadata.json's stamp
        self._held: list[TritonPin] = []  # pins of versions no longer served, still in use

    async def start(self, wait_s: float = 60.0) -> None:
        self.client = grpcaio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        self._addresses = await self._resolve()
        deadline = time.monotonic() + wait_s
        while True:
            try:
                if await self.client.is_model_ready(self.model_name, client_timeout=self.timeout_s):
                    break
            except InferenceServerException as exc:
                log.info("waiting for Triton at %s: %s", self.url, exc.message())
            if time.monotonic() > deadline:
                raise RuntimeError(f"model {self.model_name!r} not ready on Triton at {self.url}")
            await asyncio.sleep(0.5)
        meta = await self.client.get_model_metadata(
            self.model_name, as_json=True, client_timeout=self.timeout_s
        )
        self.topk = check_contract(meta["inputs"], meta["outputs"])
        try:
            served = (await self._ready_candidates())[0]
        except BackendUnavailable as exc:
            raise RuntimeError(exc.message) from None
        self.versions.served = served
        self.versions.present = self._present()
        try:
            self._serve(served, self.info_for(served))
        except BackendUnavailable as exc:
            if self.store is None or self.store.newest() is not None:
                # the repository has versions, and not this one's class list: never guess
                raise RuntimeError(exc.message) from None
            # An empty repository: the S3 sidecar's first sync has not come yet. Start, not
            # ready, and label the version (then be ready) once its files arrive.
            log.warning("version %s of %s cannot be labelled yet (%s is empty): not ready "
                        "until its class list arrives", served, self.model_name,
                        self.store.path)  # fmt: skip

    def _serve(self, version: str, info: ModelInfo) -> None:
        self.info = info
        self.versions.served = version
        self._labelled = True
        if self._pin is not None and self._pin.users:
            self._held.append(self._pin)  # requests still on it
        self._pin = TritonPin(version, info)

    async def _ready_versions(
        self, client: grpcaio.InferenceServerClient, not_ready: dict[str, str], pod: str = ""
    ) -> set[int]:
        index = await client.get_model_repository_index(as_json=True, client_timeout=self.timeout_s)
        mine = [
            m
            for m in index.get("models", [])
            if m.get("name") == self.model_name and str(m.get("version", "")).isdigit()
        ]
        for m in mine:  # what Triton says of the versions it has not made ready
            state, reason = m.get("state", "UNKNOWN"), m.get("reason") or ""
            if state != "READY" and reason != "unloaded":
                said = f"{state}: {reason}" if reason else state
                not_ready[m["version"]] = f"{said} (at {pod})" if pod else said
        return {int(m["version"]) for m in mine if m.get("state") == "READY"}

    def load_error(self, version: str) -> str | None:
        """What Triton said of ``version`` (or that it never tried it, and what it is stuck on)."""
        if version in self._not_ready:
            return f"Triton: version {version} {self._not_ready[version]}"
        refused = self.versions.refused
        if refused and refused["version"] == version:
            return refused["reason"]
        others = "; ".join(f"version {v} {s}" for v, s in sorted(self._not_ready.items()))
        return f"Triton has not tried to load version {version}" + (
            f" ({others})" if others else ""
        )

    async def _ready_candidates(self) -> list[str]:
        """The versions READY on every Triton behind the URL, highest first; those still in the
        repository only (not one retired by a rollback), where any is. Where a pod does not
        answer, the served version is not left for a higher one: that pod still gets requests
        (round robin), and may not have it."""
        pods, not_ready = self._pods(), {}
        if len(pods) <= 1:
            ready = await self._ready_versions(self.client, not_ready)
            silent = False
        else:
            answers = []
            for target in pods:
                client = self._pod_clients.get(target)
                if client is None:
                    client = self._pod_clients[target] = grpcaio.InferenceServerClient(
                        target, channel_args=CHANNEL_ARGS
                    )
                with contextlib.suppress(InferenceServerException):
                    answers.append(await self._ready_versions(client, not_ready, target))
            if not answers:
                raise BackendUnavailable(f"no Triton behind {self.url} answers")
            ready = set.intersection(*answers)
            silent = len(answers) < len(pods)
        self._not_ready = not_ready
        if self.store is not None:  # not a version retired from the repository (a rollback)
            on_disk = {v.number for v in self.store.with_metadata()}
            self._stray = set()
            if ready & on_disk:
                self._stray, ready = ready - on_disk, ready & on_disk
        served = int(self.versions.served) if self.versions.served.isdigit() else None
        if silent and served in ready:
            ready = {v for v in ready if v <= served}
        if not ready:
            raise BackendUnavailable(f"no version of {self.model_name!r} is ready on every Triton")
        return [str(v) for v in sorted(ready, reverse=True)]

    def _pods(self) -> list[str]:
        """One gRPC target per Triton behind the URL: the addresses a ``dns:///`` name resolves
        to, those an ``ipv4:``/``ipv6:`` URL lists; else the URL itself."""
        if self._addresses:
            return sorted(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self._addresses)
        if self.url.startswith(("ipv4:", "ipv6:")):
            return self.url.split(":", 1)[1].split(",")
        return [self.url]

    def _present(self) -> list[str]:
        return [v.label for v in self.store.versions()] if self.store else [self.versions.served]

    def info_for(self, version: str) -> ModelInfo:
        info = self._infos.get(version)
        if info is not None:
            return info
        if self.store is None:
            info = coco_info(self.model_name, version, "triton", self.topk, "no model repository")
        elif not version.isdigit():
            raise BackendUnavailable(f"Triton answered with an unknown version {version!r}")
        else:
            folder = self.store.version(int(version))
            try:
                info = version_info(folder, "triton", self.topk)
                stamp = folder.stamp()
            except (RuntimeError, OSError) as exc:
                # never label one version's boxes with another version's names
                raise BackendUnavailable(f"version {version} cannot be labelled: {exc}") from None
            self._stamps[version] = stamp
        self._infos[version] = info
        return info

    def _relabel(self) -> None:
        """The served version's files rewritten under its number (S3: the sidecar replaced its
        copy with another export's, a version's identity being its metadata.json): its class
        list is read again, never the old names kept."""
        served = self.versions.served
        if self.store is None or not self._labelled or not served.isdigit():
            return
        try:
            stamp = self.store.version(int(served)).stamp()
        except OSError:
            return
        if stamp == self._stamps.get(served):
            return
        log.warning("version %s of %s was rewritten: its class list is read again",
                    served, self.model_name)  # fmt: skip
        self._infos.pop(served, None)
        try:
            self._serve(served, self.info_for(served))
        except BackendUnavailable as exc:  # half replaced: unlabelled (503) until it reads
            self._stamps.pop(served, None)
            self._labelled, self._pin = False, None
            log.warning("version %s of %s cannot be labelled: %s", served, self.model_name,
                        exc.message)  # fmt: skip

    async def _resolve(self) -> frozenset | None:
        """The addresses of a ``dns:///NAME:PORT`` URL (None for any other)."""
        if not self.url.startswith("dns:///"):
            return None
        host, _, port = self.url.removeprefix("dns:///").rpartition(":")
        try:
            infos = await asyncio.to_thread(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
        except OSError:
            return self._addresses
        return frozenset(info[4][:2] for info in infos)

    async def _follow_addresses(self) -> None:
        """A new channel when the name's addresses change (Triton pods added or removed):
        gRPC resolves a name again only when a connection breaks, so new pods would get no
        requests. The old channel is closed once its requests are past their deadline."""
        now = time.monotonic()
        for item in [r for r in self._retired if r[0] < now]:
            self._retired.remove(item)
            await item[1].close()
        addresses = await self._resolve()
        if addresses is None or addresses == self._addresses:
            return
        log.info("Triton at %s: %d addresses (were %d); new channel", self.url,
                 len(addresses), len(self._addresses or ()))  # fmt: skip
        self._addresses = addresses
        self._retired.append((now + 2 * self.timeout_s + 1, self.client))
        self.client = grpcaio.InferenceServerClient(self.url, channel_args=CHANNEL_ARGS)
        for client in self._pod_clients.values():  # asked in turn, no request in flight
            await client.close()
        self._pod_clients.clear()

    async def refresh(self) -> Refresh:
        await self._follow_addresses()
        self.versions.present = self._present()
        old = self.versions.served if self._labelled else ""
        # first the served version Triton has: after a rollback, the version before is still
        # loaded (latest: 2) and requests move to it before Triton unloads the retired one
        await self._follow_served()
        self._relabel()
        refused = None
        newest = self.store.newest() if self.store else None
        if newest is not None and newest.label != self.versions.served:
            refused = await self._offer(newest)
            await self._follow_served()
        elif self._stray and self.model_control == "explicit":
            await self._unload_stray()
        retired = newest is not None and not self._on_disk(self.versions.served)
        if self.model_control == "explicit" and self._labelled and retired:
            await self._serve_newest_servable()  # the served one retired, nothing to fall back on
        if self.versions.served == old or not self._labelled:
            return Refresh(refused=refused)
        self.versions.switched_at = time.time()
        return Refresh(switched_to=self.versions.served, switched_from=old, refused=refused)

    async def _follow_served(self) -> None:
        """Serve the highest version READY everywhere whose class list can be read (one that
        cannot is refused, never served under another version's names)."""
        try:
            candidates = await self._ready_candidates()
        except (InferenceServerException, BackendUnavailable):
            return
        for version in candidates:
            if version == self.versions.served and self._labelled:
                return
            try:
                info = self.info_for(version)
            except BackendUnavailable as exc:
                if self.store is not None and version.isdigit():
                    folder = self.store.version(int(version))
                    if folder.has_metadata() and self._refused.get(folder.number) is None:
                        with contextlib.suppress(OSError):
                            self._refuse(folder, folder.stamp(), exc.message)
                continue
            self._serve(version, info)
            return

    async def _unload_stray(self) -> None:
        """Explicit mode: ask Triton to load the model again, which unloads the versions gone
        from the repository, once no request holds one of them."""
        self._held = [p for p in self._held if p.users > 0]
        if any(int(p.version) in self._stray for p in self._held if p.version.isdigit()):
            return  # next check
        with contextlib.suppress(InferenceServerException):
            await self._load_exactly([int(self.versions.served)])
        self._stray = set()

    async def _offer(self, version: ModelVersion) -> tuple[str, str] | None:
        """Ask Triton to load the model again, ``version`` being the newest one on disk and not
        the served one (a new version, or the one left after a rollback). Returns (version,
        reason) when it is refused, by the gateway (its files or class list) or by Triton; a
        refused version is not offered again until it is rewritten."""
        try:
            stamp = version.stamp()
        except OSError:
            return None
        if self._refused.get(version.number) == stamp:
            return None
        self._infos.pop(version.label, None)
        try:
            if self.model_control == "explicit":  # Triton reads them; sizes tell a truncated one
                version.verify(hashes=False)
            self.info_for(version.label)
        except (RepositoryError, BackendUnavailable) as exc:
            return self._refuse(version, stamp, str(exc))
        if self.model_control == "poll":  # each Triton loads it by itself
            return None
        keep = [int(self.versions.served)] if self._on_disk(self.versions.served) else []
        try:
            await self._load_exactly([version.number, *keep])
        except InferenceServerException as exc:
            return self._refuse(version, stamp, f"Triton could not load it: {exc.message()}")
        return None

    def _on_disk(self, version: str) -> bool:
        if self.store is None or not version.isdigit():
            return False
        return self.store.version(int(version)).has_metadata()

    def _refused_as_is(self, version: ModelVersion) -> bool:
        """Refused before, and not rewritten since."""
        try:
            return self._refused.get(version.number) == version.stamp()
        except OSError:
            return False

    async def _load_exactly(self, numbers: list[int]) -> None:
        """Explicit mode: Triton loads these versions of the model and unloads the others (the
        config's policy made specific for this load): never a version the gateway refused,
        which ``latest: 2`` would take when it is one of the two newest on disk."""
        answer = await self.client.get_model_config(
            self.model_name, as_json=True, client_timeout=self.timeout_s
        )
        config = answer["config"]
        config["version_policy"] = {"specific": {"versions": [str(n) for n in numbers]}}
        await self.client.load_model(
            self.model_name, config=json.dumps(config), client_timeout=LOAD_TIMEOUT_S
        )

    async def _serve_newest_servable(self) -> None:
        """Explicit mode, the served version gone from the repository and no version READY to
        fall back on (the newest on disk refused): Triton is asked for the newest servable one."""
        for version in reversed(self.store.with_metadata()):
            if self._refused_as_is(version):
                continue
            if version.label == self.versions.served:
                return
            try:
                stamp = version.stamp()
                version.verify(hashes=False)
                self.info_for(version.label)
            except OSError:
                continue
            except (RepositoryError, BackendUnavailable) as exc:
                self._refuse(version, stamp, str(exc))
                continue
            try:
                await self._load_exactly([version.number])
            except InferenceServerException as exc:
                if not await self._live():  # Triton away: nothing learnt of the version
                    return
                # Triton cannot load it: refused, as a new version it cannot load is, and the
                # next older one tried (it was tried again on every poll, the older never)
                self._refuse(version, stamp, f"Triton could not load it: {exc.message()}")
                continue
            self._stray = set()
            await self._follow_served()
            return

    async def _live(self) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=1.0))
        except InferenceServerException:
            return False

    def _refuse(
        self, version: ModelVersion, stamp: tuple[int, int], reason: str
    ) -> tuple[str, str]:
        self._refused[version.number] = stamp
        self.versions.refused = {"version": version.label, "reason": reason, "at": time.time()}
        self._infos.pop(version.label, None)
        return version.label, reason

    def pin(self) -> TritonPin | None:
        """The served version, named in each call of the request (None before it is labelled:
        Triton picks, and the answer cannot be labelled)."""
        if self._pin is not None:
            self._pin.users += 1
        return self._pin

    def unpin(self, pin: TritonPin | None) -> None:
        if pin is not None:
            pin.users -= 1

    async def infer(
        self, images: np.ndarray, timeout: float | None = None, pin: TritonPin | None = None
    ) -> Candidates:
        inp = grpcclient.InferInput(TENSOR_NAMES.images, list(images.shape), "UINT8")
        inp.set_data_from_numpy(images)
        outputs = [grpcclient.InferRequestedOutput(n) for n in OUTPUTS]
        deadline = self.timeout_s if timeout is None else min(timeout, self.timeout_s)
        try:
            try:
                result = await self.client.infer(
                    self.model_name,
                    [inp],
                    model_version=pin.version if pin is not None else "",
                    outputs=outputs,
                    client_timeout=deadline,
                )
            except InferenceServerException as exc:
                if pin is None or not _version_gone(exc):
                    raise
                # Triton unloaded the pinned version (a rollback it polled before the gateway
                # did): the version it serves answers, and the answer names it
                result = await self.client.infer(
                    self.model_name, [inp], outputs=outputs, client_timeout=deadline
                )
        except InferenceServerException as exc:
            status, message = _status(exc), exc.message() or str(exc)
            if "DEADLINE_EXCEEDED" in status or "Deadline" in message:
                raise BackendTimeout(
                    f"the model server did not answer within {deadline:.2f} s"
                ) from None
            if (
                "queue" in message.lower()
                or "UNAVAILABLE" in status
                or "RESOURCE_EXHAUSTED" in status
            ):
                self._ready_cache = (0.0, False)
                raise BackendUnavailable(
                    f"the model server is unavailable or overloaded: {message}"
                ) from None
            raise BackendUnavailable(f"the model server failed: {message}") from None
        version = result.get_response().model_version
        return Candidates(*(result.as_numpy(n) for n in OUTPUTS), version=version)

    async def ready(self) -> bool:
        if not self._labelled:  # answers could not be labelled yet
            return False
        now = time.monotonic()
        checked_at, value = self._ready_cache
        if now - checked_at < 0.5:
            return value
        try:
            value = bool(await self.client.is_model_ready(self.model_name, client_timeout=1.0))
        except InferenceServerException:
            value = False
        self._ready_cache = (now, value)
        return value

    async def close(self) -> None:
        for _, client in self._retired:
            await client.close()
        self._retired.clear()
        for client in self._pod_clients.values():
            await client.close()
        self._pod_clients.clear()
        if self.client is not None:
            await self.client.close()
