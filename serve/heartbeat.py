"""Worker -> controller registration and heartbeats, shared by our model worker and the upstream-backed one.

`state` needs: config.controller_address, config.worker_address, config.heart_beat_interval, client (an httpx
AsyncClient carrying the cluster token), in_flight (queue length), status() (the /worker_get_status answer), and
optionally `async ready()`: while it is False the worker does not register or heartbeat (the controller then
drops it), e.g. an upstream engine that does not answer.
"""

from __future__ import annotations

import asyncio
import logging

import httpx

logger = logging.getLogger("serve.model_worker")


async def register(state) -> None:
    r = await state.client.post(state.config.controller_address + "/register_worker", json={
        "worker_name": state.config.worker_address, "check_heart_beat": True, "worker_status": state.status(),
    })
    if r.status_code != 200:
        try:
            reason = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            reason = r.text[:500]
        raise RuntimeError(f"controller {state.config.controller_address} refused the registration "
                           f"(HTTP {r.status_code}): {reason}")
    logger.info("registered with controller %s as %s", state.config.controller_address, state.config.worker_address)


async def heart_beat_loop(state) -> None:
    """Register, then heartbeat; re-register when the controller forgets us or comes back after being down."""
    registered = False
    ready = getattr(state, "ready", None)  # an upstream-backed worker answers only while its upstream does
    while True:
        try:
            if ready is not None and not await ready():
                if registered:
                    logger.warning("upstream unavailable: heartbeats paused until it answers again")
                registered = False
                await asyncio.sleep(state.config.heart_beat_interval)
                continue
            if registered:
                r = await state.client.post(state.config.controller_address + "/receive_heart_beat", json={
                    "worker_name": state.config.worker_address, "queue_length": state.in_flight,
                })
                registered = r.status_code == 200 and bool(r.json().get("exist"))
            if not registered:
                await register(state)
                registered = True
        except RuntimeError as e:  # refused: wrong token, host not on the allowlist, ...
            registered = False
            logger.error("%s", e)
        except (httpx.HTTPError, ValueError) as e:
            registered = False
            logger.warning("controller %s not reachable: %s", state.config.controller_address, e)
        await asyncio.sleep(state.config.heart_beat_interval)
