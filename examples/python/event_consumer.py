#!/usr/bin/env python3
"""A billing system's consumer of licensd's event feed (WatchEvents), which
keeps its cursor in a file and resumes exactly where it stopped.

    # follow the feed; state (cursor + what was handled) in state.json
    python event_consumer.py consume --target 127.0.0.1:50051 --token lsd_... \\
        --state state.json [--product ACME] [--type renewed ...]

    # the demonstration CI runs (run_example.sh): a consumer that is stopped,
    # restarted and killed with SIGKILL between writes handles every event of
    # its product exactly once, in order
    python event_consumer.py --target 127.0.0.1:50051 --token lsd_... [--proto-dir ../../proto]

How it keeps its place: after handling an event it writes the event's effect
and the event's cursor to its state file in one atomic replace (write a
temporary file, fsync, rename). A consumer killed at any moment restarts
from the cursor of the last effect it recorded: nothing is lost and nothing
is handled twice. (A real consumer stores the cursor in the same database
transaction as the effect, e.g. the commission it booked.) When the stream
ends with UNAVAILABLE (a replica shutting down) or RESOURCE_EXHAUSTED (the
consumer fell behind), it reconnects from its cursor after a short pause.

The demonstration exits with status 1 at the first unexpected outcome (2 on
bad arguments), 0 when everything went as expected. Its token needs the
admin role (it creates a product); `consume` needs billing, support or admin.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

import grpc

from billing_example import UnexpectedOutcome, check, new_product_code, say, step
from licensd_client import Client, decode_refusal, generate_stubs

DEFAULT_PROTO_DIR = Path(__file__).resolve().parent.parent.parent / "proto"

# Stream ends after which the consumer reconnects from its cursor.
RESUMABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


# -- the consumer ------------------------------------------------------------


def load_state(path: Path) -> dict:
    """The consumer's state: the cursor to resume after, and what it did."""
    if path.exists():
        return json.loads(path.read_text())
    return {"cursor": "", "handled": []}


def save_state(path: Path, state: dict) -> None:
    """Replaces the state file atomically: a crash leaves the old or the new."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def consume(
    client: Client,
    state_path: Path,
    product: str = "",
    types: tuple = (),
    max_events: Optional[int] = None,
    idle_seconds: Optional[float] = None,
) -> int:
    """Follows the feed from the state file's cursor, handling each event and
    recording it with its cursor. Returns after ``max_events`` events, or
    after ``idle_seconds`` without a message; runs forever otherwise."""
    pb2 = client.pb2
    state = load_state(state_path)
    handled = 0
    while True:
        request = pb2.WatchEventsRequest(
            after=state["cursor"], product=product, event_types=list(types)
        )
        # No deadline: a stream lives as long as it is read. HTTP/2
        # keepalive (licensd pings every 30 s) finds a dead connection.
        call = client.licenses.WatchEvents(request, metadata=client._auth)
        idle = IdleTimer(call, idle_seconds)
        try:
            for message in call:
                idle.touch()
                if message.HasField("event"):
                    e = message.event
                    # The effect (here: a line of the ledger) and the cursor,
                    # recorded together.
                    state["handled"].append(
                        {"id": e.id, "type": e.type, "license_key": e.license_key}
                    )
                    handled += 1
                state["cursor"] = message.cursor
                save_state(state_path, state)
                if max_events is not None and handled >= max_events:
                    call.cancel()
                    return handled
        except grpc.RpcError as err:
            if idle.fired:
                return handled
            refusal = decode_refusal(err)
            if refusal.code in RESUMABLE:
                say(f"stream ended {refusal.code.name} {refusal.reason}; resuming")
                time.sleep(0.2)
                continue
            raise
        finally:
            idle.stop()


class IdleTimer:
    """Cancels ``call`` after ``seconds`` without a message (None: never)."""

    def __init__(self, call, seconds: Optional[float]):
        self.call, self.seconds, self.fired = call, seconds, False
        self.last = time.monotonic()
        self.done = threading.Event()
        if seconds is not None:
            threading.Thread(target=self._watch, daemon=True).start()

    def touch(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self.done.set()

    def _watch(self) -> None:
        while not self.done.wait(0.1):
            if time.monotonic() - self.last > self.seconds:
                self.fired = True
                self.call.cancel()
                return


# -- the demonstration -------------------------------------------------------


def consumer_process(args, state: Path, product: str, *extra: str) -> subprocess.Popen:
    """This script's `consume` in a process of its own (a real restart)."""
    command = [
        sys.executable,
        __file__,
        "consume",
        "--target",
        args.target,
        "--token",
        args.token,
        "--proto-dir",
        str(args.proto_dir),
        "--state",
        str(state),
        "--product",
        product,
        *extra,
    ]
    return subprocess.Popen(command)


def handled_ids(state: Path) -> list:
    return [h["id"] for h in load_state(state)["handled"]]


def demo(client: Client, args) -> None:
    pb2 = client.pb2
    run_id = uuid.uuid4().hex[:8]
    product = new_product_code()
    state = Path(args.state_dir) / f"consumer-{run_id}.json"

    step(f"Product {product}: a license, two workstations")
    client.create_product(code=product, display_name=f"Feed demo {run_id}", latest_version="1.0.0")
    license_ = client.issue_license(
        request_id=f"feed-{run_id}-license",
        product=product,
        edition=pb2.EDITION_BUSINESS,
        seats=2,
        term_years=1,
    )
    key = license_.key
    for ws in ("ws-1", "ws-2"):
        client.activate(key, ws, hostname=ws, client_version="1.0.0")
    say("3 events so far: issued, activated, activated")

    step("A consumer handles 2 events and stops")
    status = consumer_process(args, state, product, "--max-events", "2").wait(timeout=60)
    check(status == 0, f"the consumer exited with status {status}")
    check(len(handled_ids(state)) == 2, f"handled {handled_ids(state)}")
    say(f"state file: {load_state(state)['cursor']} after {handled_ids(state)}")

    step("More writes while no consumer runs; a consumer restarts and is killed mid-stream")
    client.deactivate(key, "ws-1")
    client._billing(
        client.licenses.SuspendLicense,
        pb2.SuspendLicenseRequest(license_key=key, reason="late payment"),
    )
    client._billing(
        client.licenses.ReinstateLicense,
        pb2.ReinstateLicenseRequest(license_key=key, reason="paid"),
    )
    running = consumer_process(args, state, product)
    deadline = time.monotonic() + 30
    while len(handled_ids(state)) < 4 and time.monotonic() < deadline:
        time.sleep(0.02)
    running.send_signal(signal.SIGKILL)
    running.wait(timeout=10)
    say(f"killed with SIGKILL after {len(handled_ids(state))} events")

    step("A renewal while it is down; it restarts and catches up")
    code = client.issue_renewal_code(
        request_id=f"feed-{run_id}-code",
        product=product,
        edition=pb2.EDITION_BUSINESS,
        seats=2,
        term_years=1,
    ).renewal_code
    client.redeem_renewal_code(key, code, "ws-2", "1.0.0")
    status = consumer_process(args, state, product, "--idle-seconds", "2").wait(timeout=60)
    check(status == 0, f"the consumer exited with status {status}")

    step("Every event of the product handled exactly once, in feed order")
    truth = []
    after = ""
    while True:
        page = client._billing(
            client.licenses.ListEvents,
            pb2.ListEventsRequest(after=after, product=product, page_size=100),
        )
        truth.extend((e.id, e.type) for e in page.events)
        after = page.next_cursor
        if len(page.events) < 100:
            break
    got = [(h["id"], h["type"]) for h in load_state(state)["handled"]]
    check(got == truth, f"handled {got}, the feed has {truth}")
    expected = ["issued", "activated", "activated", "deactivated", "suspended", "reinstated", "renewed"]
    check([t for _, t in got] == expected, f"types {[t for _, t in got]}")
    for event_id, kind in got:
        say(f"{event_id:>6}  {kind}")

    step("A malformed cursor is refused")
    try:
        client._billing(client.licenses.ListEvents, pb2.ListEventsRequest(after="not-a-cursor"))
        raise UnexpectedOutcome("a malformed cursor was accepted")
    except grpc.RpcError as err:
        refusal = decode_refusal(err)
        check(refusal.code == grpc.StatusCode.INVALID_ARGUMENT, f"got {refusal}")
        say(f"{refusal.code.name} {refusal.reason}")
    state.unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", nargs="?", default="demo", choices=["demo", "consume"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--proto-dir", type=Path, default=DEFAULT_PROTO_DIR)
    parser.add_argument("--state", type=Path, help="consume: the state file")
    parser.add_argument("--state-dir", default=os.environ.get("TMPDIR", "/tmp"))
    parser.add_argument("--product", default="")
    parser.add_argument("--type", action="append", default=[], dest="types")
    parser.add_argument("--max-events", type=int)
    parser.add_argument("--idle-seconds", type=float)
    args = parser.parse_args()
    stubs = generate_stubs(args.proto_dir)
    with Client(args.target, args.token, stubs) as client:
        client.wait_ready()
        if args.mode == "consume":
            if args.state is None:
                parser.error("consume needs --state")
            consume(
                client,
                args.state,
                args.product,
                tuple(args.types),
                args.max_events,
                args.idle_seconds,
            )
            return 0
        try:
            demo(client, args)
        except UnexpectedOutcome as e:
            print(f"UNEXPECTED: {e}", file=sys.stderr)
            return 1
    print("\nThe event feed behaved as expected.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
