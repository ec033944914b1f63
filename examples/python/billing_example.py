#!/usr/bin/env python3
"""A billing system's round trip through licensd, in Python.

    python billing_example.py --target 127.0.0.1:50051 --token lsd_... [--proto-dir ../../proto]

It creates a product, sells a license and a renewal code for it, activates a
workstation as the installed product would, renews the license with the code,
reads the license's history and shows how a refusal is decoded. Each step is
checked; the script exits with status 1 at the first unexpected outcome (and
2 on bad arguments), 0 when everything went as expected.

The token needs the admin role (creating a product is an admin call); the
stubs are generated from --proto-dir at start (see licensd_client.py).
"""

from __future__ import annotations

import argparse
import calendar
import datetime as dt
import secrets
import socket
import string
import sys
import uuid
from pathlib import Path

import grpc

from licensd_client import Client, decode_refusal, enum_name, generate_stubs

DEFAULT_PROTO_DIR = Path(__file__).resolve().parent.parent.parent / "proto"
UTC = dt.timezone.utc


class UnexpectedOutcome(Exception):
    """A step did not turn out as a billing system would expect."""


def check(condition: bool, what: str) -> None:
    if not condition:
        raise UnexpectedOutcome(what)


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def say(text: str) -> None:
    print(f"   {text}", flush=True)


def new_product_code() -> str:
    """A fresh product code: "PY" and 4 random characters of A-Z/0-9, never
    containing PRO or NFR (a key containing them would read as a promotional
    or not-for-resale license)."""
    alphabet = string.ascii_uppercase + string.digits
    while True:
        code = "PY" + "".join(secrets.choice(alphabet) for _ in range(4))
        if "PRO" not in code and "NFR" not in code:
            return code


def add_years(t: dt.datetime, years: int) -> dt.datetime:
    """Calendar years, as licensd counts them: 29 February plus one year is
    28 February (the last day of the month)."""
    year = t.year + years
    day = min(t.day, calendar.monthrange(year, t.month)[1])
    return t.replace(year=year, day=day)


def when(ts) -> str:
    return ts.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")


def run(client: Client, pb2) -> None:
    run_id = uuid.uuid4().hex[:12]
    fingerprint = f"ws-{run_id}"
    edition = pb2.EDITION_BUSINESS
    seats, term_years = 2, 1

    # 1. Product ----------------------------------------------------------
    code = new_product_code()
    step(f"Creating product {code}, whose latest release is 4.10.0")
    product = client.create_product(
        code=code, display_name="Python billing example", latest_version="4.10.0"
    )
    say(
        f"Created {product.code} ({product.display_name}): business terms "
        f"{list(product.business_terms_years)} years, grace period "
        f"{product.grace_period_months} month(s), renewals count "
        f"{enum_name(pb2.RenewalBasis, product.renewal_basis)}"
    )
    check(product.code == code, f"the product came back as {product.code!r}, not {code!r}")

    # 2. License -----------------------------------------------------------
    request_id = f"order-{run_id}"
    step(f"Selling a {seats}-seat business license for {term_years} year (request id {request_id})")
    license_ = client.issue_license(
        request_id=request_id,
        product=code,
        edition=edition,
        seats=seats,
        term_years=term_years,
        order_ref=f"PY-{run_id}",
        customer_ref="cust-python-example",
    )
    say(f"License key {license_.key}")
    say(f"Valid from {when(license_.starts_at)} until {when(license_.expires_at)}")
    check(license_.key.startswith(code), f"the key {license_.key} does not start with {code}")
    check(
        license_.kind == pb2.LICENSE_KIND_STANDARD,
        f"the license is {enum_name(pb2.LicenseKind, license_.kind)}, not STANDARD",
    )

    say("Sending the same request again, as a billing system retrying after a time-out would")
    retried = client.issue_license(
        request_id=request_id,
        product=code,
        edition=edition,
        seats=seats,
        term_years=term_years,
        order_ref=f"PY-{run_id}",
        customer_ref="cust-python-example",
    )
    check(retried.key == license_.key, f"the retry issued a second license {retried.key}")
    say("Same license again: no duplicate was issued")

    # 3. Renewal code --------------------------------------------------------
    step(f"Selling a renewal code for {term_years} more year")
    renewal = client.issue_renewal_code(
        request_id=f"renewal-{run_id}",
        product=code,
        edition=edition,
        seats=seats,
        term_years=term_years,
        order_ref=f"PY-{run_id}-R",
    )
    say(f"Renewal code {renewal.renewal_code} (public id {renewal.id}), to give to the customer")
    check(
        renewal.state == pb2.RENEWAL_CODE_STATE_UNREDEEMED,
        f"the new code is {enum_name(pb2.RenewalCodeState, renewal.state)}",
    )

    # 4. Activation ----------------------------------------------------------
    step(f"Activating workstation {fingerprint} with the license key (the key is the credential)")
    activated = client.activate(
        license_key=license_.key,
        fingerprint=fingerprint,
        hostname=socket.gethostname() or "example-host",
        client_version=product.latest_version,
    )
    say(f"Activated: {activated.license.seats_used} of {activated.license.seats} seats in use")
    check(activated.license.seats_used == 1, f"{activated.license.seats_used} seats in use, not 1")

    # 5. Validation ------------------------------------------------------------
    step("Asking whether the license is valid on that workstation")
    validity = client.validate(
        license_key=license_.key, fingerprint=fingerprint, client_version=product.latest_version
    )
    say(
        f"{enum_name(pb2.Validity, validity.validity)}: valid={validity.valid}, "
        f"expires {when(validity.expires_at)}, update available: {validity.update_available}"
    )
    check(
        validity.valid and validity.validity == pb2.VALIDITY_VALID,
        f"the license is {enum_name(pb2.Validity, validity.validity)} after activation",
    )

    # 6. Redemption ------------------------------------------------------------
    step(f"Redeeming the renewal code on the workstation, running version {product.latest_version}")
    before = client.get_license(license_.key).expires_at
    redeemed = client.redeem_renewal_code(
        license_key=license_.key,
        renewal_code=renewal.renewal_code,
        fingerprint=fingerprint,
        client_version=product.latest_version,
    )
    after = redeemed.license.expires_at
    say(f"Renewed: expiry moved from {when(redeemed.previous_expires_at)} to {when(after)}")
    check(
        redeemed.previous_expires_at == before,
        f"previous_expires_at {when(redeemed.previous_expires_at)} "
        f"is not the expiry {when(before)}",
    )
    expected = add_years(before.ToDatetime(tzinfo=UTC), renewal.term_years)
    check(
        after.ToDatetime(tzinfo=UTC) == expected and after.nanos == before.nanos,
        f"the new expiry {after.ToJsonString()} is not {before.ToJsonString()} "
        f"plus {renewal.term_years} year(s)",
    )
    check(redeemed.license.key == license_.key, "the renewal changed the license key")
    check(redeemed.license.renewal_count == 1, f"renewal_count is {redeemed.license.renewal_count}")
    say(f"The key stays {redeemed.license.key}; renewal count {redeemed.license.renewal_count}")

    # 7. A refusal, decoded -----------------------------------------------------
    step("Redeeming the same code a second time, which licensd must refuse")
    try:
        client.redeem_renewal_code(
            license_key=license_.key,
            renewal_code=renewal.renewal_code,
            fingerprint=fingerprint,
            client_version=product.latest_version,
        )
    except grpc.RpcError as err:
        refusal = decode_refusal(err)
        say(f"Refused with status {refusal.code.name}: {err.details()}")
        say(f"ErrorInfo reason {refusal.reason}, metadata {refusal.metadata}")
        check(
            (refusal.code, refusal.reason)
            == (grpc.StatusCode.FAILED_PRECONDITION, "RENEWAL_CODE_ALREADY_REDEEMED"),
            f"expected FAILED_PRECONDITION RENEWAL_CODE_ALREADY_REDEEMED, got "
            f"{refusal.code.name} {refusal.reason or '(no ErrorInfo)'}",
        )
    else:
        raise UnexpectedOutcome("the code was redeemed a second time")
    code_state = client.get_renewal_code(renewal.renewal_code)
    say(
        f"Support can see where it went: {enum_name(pb2.RenewalCodeState, code_state.state)} "
        f"on {code_state.redeemed_license_key} at {when(code_state.redeemed_at)}"
    )

    # 8. History -----------------------------------------------------------------
    step("Reading the license's history")
    events = list(client.license_events(license_.key))
    for event in events:
        line = f"#{event.id} {when(event.at)} {event.type} by {event.actor}"
        if event.fingerprint:
            line += f", workstation {event.fingerprint}"
        if event.HasField("old_expires_at") and event.HasField("new_expires_at"):
            line += f", expiry {when(event.old_expires_at)} -> {when(event.new_expires_at)}"
        if event.refusal_reason:
            line += f", refused: {event.refusal_reason}"
        say(line)
    types_seen = [event.type for event in events]
    for wanted in ("issued", "activated", "renewed"):
        check(wanted in types_seen, f"the history has no {wanted!r} event: {types_seen}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="licensd address, e.g. 127.0.0.1:50051")
    parser.add_argument(
        "--token", required=True, help="an admin bearer token (licensd token create)"
    )
    parser.add_argument(
        "--proto-dir",
        default=str(DEFAULT_PROTO_DIR),
        help=f"the directory holding licensing/v1/licensing.proto (default {DEFAULT_PROTO_DIR})",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call (default 10)")
    args = parser.parse_args(argv)

    print(f"Generating the Python stubs from {args.proto_dir}", flush=True)
    stubs = generate_stubs(args.proto_dir)
    with Client(args.target, args.token, stubs, timeout=args.timeout) as client:
        try:
            print(f"Connecting to licensd at {args.target}", flush=True)
            client.wait_ready(timeout=args.timeout)
            run(client, stubs.pb2)
        except grpc.FutureTimeoutError:
            print(
                f"\nFAILED: could not connect to {args.target} within {args.timeout} s",
                file=sys.stderr,
            )
            return 1
        except UnexpectedOutcome as err:
            print(f"\nFAILED: {err}", file=sys.stderr)
            return 1
        except grpc.RpcError as err:
            refusal = decode_refusal(err)
            print(
                f"\nFAILED: unexpected refusal {refusal.code.name} "
                f"{refusal.reason or '(no ErrorInfo)'} {refusal.metadata}: {err.details()}",
                file=sys.stderr,
            )
            return 1
    print("\nAll steps went as expected.", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
