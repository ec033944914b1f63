#!/usr/bin/env python3
"""Offline license certificates, checked in Python as an installed product would.

    python verify_offline.py --target 127.0.0.1:50051 --token lsd_... [--proto-dir ../../proto]

Online, it creates a product whose certificates last 14 days, sells a license,
activates this machine and fetches the signing keys (GetSigningKeys). Then,
without calling licensd, it verifies the certificate with PyJWT and the keys,
as a product does while licensd is out of reach, and shows that a tampered
certificate (seats changed, `alg: none`, an HMAC key-confusion header, an
unknown key, another machine, another product, a clock set back) is refused.
Back online it checks when Validate hands out a certificate and when it does
not, and that a suspension reaches an offline machine only when its
certificate expires. See docs/offline.md.

Each step is checked; the script exits with status 1 at the first unexpected
outcome (and 2 on bad arguments), 0 when everything went as expected. The
token needs the admin role (creating a product is an admin call).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Optional

import grpc
import jwt
from google.protobuf import field_mask_pb2

from billing_example import UnexpectedOutcome, check, new_product_code, say, step, when
from licensd_client import Client, decode_refusal, enum_name, generate_stubs

DEFAULT_PROTO_DIR = Path(__file__).resolve().parent.parent.parent / "proto"

# What the product expects of its certificates.
ISSUER = "licensd"  # the server's --certificate-issuer
ALGORITHMS = ["EdDSA"]  # the only algorithm accepted, whatever a header says
REQUIRED_CLAIMS = ["exp", "iat", "nbf", "sub", "aud", "iss", "jti"]
LEEWAY_SECONDS = 60  # tolerated difference between this machine's clock and licensd's
LEASE_DAYS = 14  # the product's offline_lease_days in this example


class Refused(Exception):
    """The product's own checks refused a certificate (PyJWT's refusals are
    jwt.PyJWTError subclasses)."""


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_json(obj) -> str:
    return b64url(json.dumps(obj, separators=(",", ":")).encode())


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def machine_fingerprint(run_id: str) -> str:
    """A stand-in for the product's machine fingerprint: a hash of the host
    name and a MAC address. The run id keeps runs apart on one machine."""
    raw = f"{socket.gethostname()}|{uuid.getnode():012x}|{run_id}".encode()
    return "fp-" + hashlib.sha256(raw).hexdigest()[:32]


def jwk_thumbprint(jwk: dict) -> str:
    """RFC 7638 thumbprint of an OKP key: SHA-256 of its required members in
    lexicographic order, without spaces, base64url."""
    canonical = json.dumps(
        {"crv": jwk["crv"], "kty": jwk["kty"], "x": jwk["x"]}, separators=(",", ":"), sort_keys=True
    )
    return b64url(hashlib.sha256(canonical.encode()).digest())


# -- What the installed product does offline --------------------------------


def verify_offline(
    certificate: str,
    pinned: jwt.PyJWKSet,
    product_code: str,
    fingerprint: str,
    last_seen: Optional[float],
    now: Optional[float] = None,
) -> tuple:
    """Verifies `certificate` with no network: the keys are `pinned` (shipped
    with the product), `last_seen` is the latest time this product has seen
    (kept in its own storage), `now` this machine's clock (default: time.time(),
    the clock PyJWT reads too). Returns (claims, new last_seen); raises a
    jwt.PyJWTError or Refused when the certificate must not be trusted."""
    now = time.time() if now is None else now
    # A clock set back before a time already seen is refused: it would
    # stretch a certificate past its exp.
    if last_seen is not None and now < last_seen - LEEWAY_SECONDS:
        raise Refused(
            f"the clock went backwards: now {now:.0f} is before the last time seen {last_seen:.0f}"
        )
    # The header's kid only picks one of the pinned keys; its alg is not
    # trusted (decode accepts EdDSA only, and the PyJWK is bound to EdDSA).
    kid = jwt.get_unverified_header(certificate).get("kid")
    try:
        key = pinned[kid]
    except KeyError:
        raise Refused(f"kid {kid!r} is not one of the pinned keys") from None
    claims = jwt.decode(
        certificate,
        key,
        algorithms=ALGORITHMS,
        audience=product_code,
        issuer=ISSUER,
        leeway=LEEWAY_SECONDS,
        options={"require": REQUIRED_CLAIMS},
    )
    if claims.get("fingerprint") != fingerprint:
        raise Refused(
            f"the certificate is bound to {claims.get('fingerprint')!r}, not to this machine"
        )
    return claims, max(now, last_seen or now)


def expect_refusal(what: str, expected, certificate: str, pinned, code: str, fingerprint: str,
                   last_seen: Optional[float] = None, now: Optional[float] = None) -> None:
    """Checks that verify_offline refuses `certificate` with an `expected` exception."""
    try:
        verify_offline(certificate, pinned, code, fingerprint, last_seen, now)
    except (jwt.PyJWTError, Refused) as err:
        check(
            isinstance(err, expected),
            f"{what}: refused with {type(err).__name__}, expected {expected.__name__}",
        )
        say(f"refused, as it must be: {what} -> {type(err).__name__}: {err}")
        return
    raise UnexpectedOutcome(f"{what}: the certificate was ACCEPTED")


def print_claims(claims: dict) -> None:
    for name in ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "fingerprint", "edition",
                 "kind", "seats", "license_expires_at", "latest_version"):
        value = claims.get(name)
        shown = repr(value)
        if name in ("iat", "nbf", "exp", "license_expires_at") and isinstance(value, int):
            shown += time.strftime("  (%Y-%m-%dT%H:%M:%SZ)", time.gmtime(value))
        say(f"  {name:<18} {shown}")


def check_certificate_of(resp_cert: str, what: str) -> None:
    check(bool(resp_cert), f"{what} carries no license_certificate")
    check(resp_cert.count(".") == 2, f"{what}'s certificate is not a compact JWS")


# -- The walk-through ---------------------------------------------------------


def run(client: Client, pb2, token: str) -> None:
    run_id = uuid.uuid4().hex[:12]
    fingerprint = machine_fingerprint(run_id)
    bearer = (("authorization", f"Bearer {token}"),)

    # 1. A product whose certificates last 14 days ---------------------------
    code = new_product_code()
    step(f"Creating product {code} with offline_lease_days {LEASE_DAYS}")
    product = client.create_product(
        code=code,
        display_name="Python offline example",
        latest_version="4.10.0",
        offline_lease_days=LEASE_DAYS,
    )
    check(
        product.HasField("offline_lease_days") and product.offline_lease_days == LEASE_DAYS,
        f"the product came back with offline_lease_days {product.offline_lease_days}",
    )
    say(f"Created {product.code}: certificates last {product.offline_lease_days} days")

    # 2. A license -------------------------------------------------------------
    step("Selling a 2-seat business license for 1 year")
    license_ = client.issue_license(
        request_id=f"offline-{run_id}",
        product=code,
        edition=pb2.EDITION_BUSINESS,
        seats=2,
        term_years=1,
        order_ref=f"PY-{run_id}",
    )
    say(f"License key {license_.key}, expires {when(license_.expires_at)}")

    # 3. Activation hands out the first certificate ---------------------------
    step(f"Activating this machine ({fingerprint})")
    activated = client.activate(
        license_key=license_.key,
        fingerprint=fingerprint,
        hostname=socket.gethostname() or "example-host",
        client_version="4.10.0",
    )
    certificate = activated.license_certificate
    check_certificate_of(certificate, "ActivateResponse")
    say(f"Activated; certificate of {len(certificate)} characters: {certificate[:48]}…")

    # 4. The keys, as the product's build would pin them ------------------------
    step("Fetching the signing keys (GetSigningKeys, no token), as the product's build pins them")
    jwks_json = client.activation.GetSigningKeys(
        pb2.GetSigningKeysRequest(), timeout=client.timeout
    ).jwks
    jwks = json.loads(jwks_json)
    check(bool(jwks.get("keys")), f"the key set holds no keys: {jwks_json}")
    for jwk in jwks["keys"]:
        say(f"kid {jwk.get('kid')}: kty {jwk.get('kty')}, crv {jwk.get('crv')}, "
            f"alg {jwk.get('alg')}, use {jwk.get('use')}")
        check(
            (jwk.get("kty"), jwk.get("crv"), jwk.get("alg"), jwk.get("use"))
            == ("OKP", "Ed25519", "EdDSA", "sig"),
            f"unexpected key parameters: {jwk}",
        )
        check("d" not in jwk, "the key set carries a private key ('d')")
        check(len(unb64url(jwk["x"])) == 32, "an Ed25519 public key is not 32 bytes")
        check(jwk["kid"] == jwk_thumbprint(jwk), f"kid {jwk['kid']} is not the RFC 7638 thumbprint")
    say("Every kid is its key's RFC 7638 thumbprint; no private part is published")
    pinned = jwt.PyJWKSet.from_json(jwks_json)

    # 5. Offline: verify ----------------------------------------------------------
    step("OFFLINE from here: verifying the certificate with the pinned keys only")
    header = jwt.get_unverified_header(certificate)
    say(f"header {header}")
    check(
        (header.get("alg"), header.get("typ")) == ("EdDSA", "JWT"),
        f"unexpected header {header}",
    )
    claims, last_seen = verify_offline(certificate, pinned, code, fingerprint, last_seen=None)
    say("signature, kid, aud, iss, exp, iat, nbf and fingerprint check out; the claims:")
    print_claims(claims)
    expected = {
        "iss": ISSUER,
        "sub": license_.key,
        "aud": code,
        "fingerprint": fingerprint,
        "edition": "BUSINESS",
        "kind": "STANDARD",
        "seats": 2,
        "license_expires_at": license_.expires_at.seconds,
        "latest_version": "4.10.0",
    }
    for name, value in expected.items():
        check(claims.get(name) == value, f"claim {name} is {claims.get(name)!r}, not {value!r}")
    check(claims["nbf"] == claims["iat"], "nbf is not iat")
    check(
        claims["exp"] == min(claims["iat"] + LEASE_DAYS * 86400, license_.expires_at.seconds),
        f"exp {claims['exp']} is not the earlier of iat + {LEASE_DAYS} days and the license's end",
    )
    check(abs(claims["iat"] - time.time()) < 120, f"iat {claims['iat']} is not about now")
    say(f"exp = iat + {LEASE_DAYS} days (the license itself runs for a year): "
        f"the product may run offline until {time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(claims['exp']))}")

    # 6. Offline: tampering ------------------------------------------------------
    step("OFFLINE: certificates that must be refused")
    head_b64, payload_b64, signature_b64 = certificate.split(".")

    more_seats = dict(claims, seats=200)
    expect_refusal("payload edited (seats 2 -> 200), signature kept", jwt.InvalidSignatureError,
                   f"{head_b64}.{b64url_json(more_seats)}.{signature_b64}", pinned, code, fingerprint)

    later = dict(claims, exp=claims["exp"] + 365 * 86400)
    expect_refusal("payload edited (exp one year later), signature kept", jwt.InvalidSignatureError,
                   f"{head_b64}.{b64url_json(later)}.{signature_b64}", pinned, code, fingerprint)

    none_header = dict(header, alg="none")
    expect_refusal("header alg 'none', no signature", jwt.InvalidAlgorithmError,
                   f"{b64url_json(none_header)}.{b64url_json(more_seats)}.", pinned, code, fingerprint)

    # Key confusion: HMAC "signed" with the published public key as secret.
    public_x = {jwk["kid"]: jwk for jwk in jwks["keys"]}[header["kid"]]["x"]
    hs_head = b64url_json(dict(header, alg="HS256"))
    hs_payload = b64url_json(more_seats)
    hs_sig = b64url(hmac.new(public_x.encode(), f"{hs_head}.{hs_payload}".encode(),
                             hashlib.sha256).digest())
    expect_refusal("header alg 'HS256', HMAC with the public key as secret",
                   jwt.InvalidAlgorithmError, f"{hs_head}.{hs_payload}.{hs_sig}",
                   pinned, code, fingerprint)

    unknown_kid = b64url_json(dict(header, kid="not-a-pinned-key"))
    expect_refusal("header kid not among the pinned keys", Refused,
                   f"{unknown_kid}.{payload_b64}.{signature_b64}", pinned, code, fingerprint)

    expect_refusal("genuine certificate copied to another machine", Refused,
                   certificate, pinned, code, machine_fingerprint("another-machine"))

    other_code = "PY" + ("ZZZZ" if code != "PYZZZZ" else "YYYY")
    expect_refusal(f"genuine certificate presented to another product ({other_code})",
                   jwt.InvalidAudienceError, certificate, pinned, other_code, fingerprint)

    # The product saw `last_seen`; a week later it kept that (say), then the
    # user set the clock back three days.
    week_later = last_seen + 7 * 86400
    expect_refusal("clock set back 3 days behind the last time seen", Refused,
                   certificate, pinned, code, fingerprint,
                   last_seen=week_later, now=week_later - 3 * 86400)
    say("(the clock guard only uses the product's own storage: no call to licensd)")

    # 7. Online again: refresh ---------------------------------------------------
    step("Online again: Validate with this machine's fingerprint hands out a certificate")
    validity = client.validate(license_key=license_.key, fingerprint=fingerprint,
                               client_version="4.10.0")
    say(f"{enum_name(pb2.Validity, validity.validity)}; certificate of "
        f"{len(validity.license_certificate)} characters")
    check(validity.validity == pb2.VALIDITY_VALID,
          f"Validate says {enum_name(pb2.Validity, validity.validity)}")
    check_certificate_of(validity.license_certificate, "ValidateResponse")
    refreshed, last_seen = verify_offline(validity.license_certificate, pinned, code, fingerprint,
                                          last_seen)
    say("it verifies; the product stores it in place of the old one"
        + (" (the same one as Activate's: handed out again while it is fresh)"
           if validity.license_certificate == certificate else " (signed anew)"))
    certificate = validity.license_certificate

    step("Validate saying which certificate it holds (certificate_expires_at): none again")
    held_exp = refreshed["exp"]
    request = pb2.ValidateRequest(license_key=license_.key, fingerprint=fingerprint,
                                  client_version="4.10.0")
    request.certificate_expires_at.FromSeconds(held_exp)
    hinted = client._device(client.activation.Validate, request)
    say(f"{enum_name(pb2.Validity, hinted.validity)}; license_certificate "
        f"{hinted.license_certificate!r} (the one held expires {held_exp}; a new one would "
        "not last half a lease longer)")
    check(hinted.validity == pb2.VALIDITY_VALID,
          f"Validate says {enum_name(pb2.Validity, hinted.validity)}")
    check(hinted.license_certificate == "", "a fresh certificate was sent again")

    step("Validate without a fingerprint hands out none")
    anonymous = client.validate(license_key=license_.key)
    say(f"{enum_name(pb2.Validity, anonymous.validity)}; license_certificate "
        f"{anonymous.license_certificate!r}")
    check(anonymous.validity == pb2.VALIDITY_VALID,
          f"Validate says {enum_name(pb2.Validity, anonymous.validity)}")
    check(anonymous.license_certificate == "",
          "Validate without a fingerprint handed out a certificate")

    step("Validate with a fingerprint that is not activated hands out none")
    stranger = client.validate(license_key=license_.key,
                               fingerprint=machine_fingerprint("not-activated"))
    say(f"{enum_name(pb2.Validity, stranger.validity)}; license_certificate "
        f"{stranger.license_certificate!r}")
    check(stranger.validity == pb2.VALIDITY_NOT_ACTIVATED,
          f"Validate says {enum_name(pb2.Validity, stranger.validity)}")
    check(stranger.license_certificate == "", "an unbound workstation got a certificate")

    # 8. offline_lease_days 0: no certificates -------------------------------------
    step(f"UpdateProduct {code}: offline_lease_days 0 (FieldMask path offline_lease_days)")
    updated = client.products.UpdateProduct(
        pb2.UpdateProductRequest(
            product=pb2.Product(code=code, offline_lease_days=0),
            update_mask=field_mask_pb2.FieldMask(paths=["offline_lease_days"]),
        ),
        metadata=bearer,
        timeout=client.timeout,
    )
    check(updated.offline_lease_days == 0,
          f"offline_lease_days is {updated.offline_lease_days} after the update")
    check(updated.latest_version == "4.10.0", "the update changed latest_version too")
    off = client.validate(license_key=license_.key, fingerprint=fingerprint)
    say(f"{enum_name(pb2.Validity, off.validity)}; license_certificate {off.license_certificate!r}")
    check(off.validity == pb2.VALIDITY_VALID, "the license is no longer valid")
    check(off.license_certificate == "", "a product with offline_lease_days 0 handed out one")
    client.products.UpdateProduct(
        pb2.UpdateProductRequest(
            product=pb2.Product(code=code, offline_lease_days=LEASE_DAYS),
            update_mask=field_mask_pb2.FieldMask(paths=["offline_lease_days"]),
        ),
        metadata=bearer,
        timeout=client.timeout,
    )
    say(f"set back to {LEASE_DAYS} days")

    # 9. Suspension and the lease ----------------------------------------------------
    step("Suspending the license: no new certificate, but the one stored still verifies")
    client.licenses.SuspendLicense(
        pb2.SuspendLicenseRequest(license_key=license_.key, reason="offline example"),
        metadata=bearer,
        timeout=client.timeout,
    )
    suspended = client.validate(license_key=license_.key, fingerprint=fingerprint)
    say(f"{enum_name(pb2.Validity, suspended.validity)}; license_certificate "
        f"{suspended.license_certificate!r}")
    check(suspended.validity == pb2.VALIDITY_SUSPENDED,
          f"Validate says {enum_name(pb2.Validity, suspended.validity)}")
    check(suspended.license_certificate == "", "a suspended license got a certificate")
    stored, _ = verify_offline(certificate, pinned, code, fingerprint, last_seen)
    say("an online product obeys Validate and stops; a machine that stays offline keeps "
        "running on its stored certificate until "
        f"{time.strftime('%Y-%m-%d %H:%M:%SZ', time.gmtime(stored['exp']))} "
        f"(offline_lease_days {LEASE_DAYS} is that trade-off)")


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
            run(client, stubs.pb2, args.token)
        except grpc.FutureTimeoutError:
            print(
                f"\nFAILED: could not connect to {args.target} within {args.timeout} s",
                file=sys.stderr,
            )
            return 1
        except (UnexpectedOutcome, Refused, jwt.PyJWTError) as err:
            print(f"\nFAILED: {type(err).__name__}: {err}", file=sys.stderr)
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
