"""A small Python client for licensd, the licensing gRPC service.

The stubs are generated from the service's .proto files at run time, into a
temporary directory, with grpcio-tools: nothing generated is kept in the
repository, and the client always matches the proto it is given.

    stubs = generate_stubs("../../proto")
    with Client("127.0.0.1:50051", token, stubs) as client:
        product = client.create_product(code="ACME", display_name="Acme CAD")
        ...

Refusals are grpc.RpcError exceptions; ``decode_refusal(err)`` reads the
google.rpc.ErrorInfo that licensd attaches to each of them (its reason, such
as RENEWAL_CODE_ALREADY_REDEEMED, and its metadata).
"""

from __future__ import annotations

import atexit
import importlib
import importlib.resources
import shutil
import sys
import tempfile
import types
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Sequence

import grpc
from google.rpc import error_details_pb2, status_pb2

# The proto file of the API, relative to the proto directory.
LICENSING_PROTO = "licensing/v1/licensing.proto"
# The domain of every ErrorInfo that licensd sends.
ERROR_DOMAIN = "licensing.v1"
# Trailing metadata key that carries a serialized google.rpc.Status.
STATUS_DETAILS_KEY = "grpc-status-details-bin"

_stubs_cache: dict = {}


def generate_stubs(proto_dir) -> types.SimpleNamespace:
    """Generates and imports the Python stubs of licensing.v1.

    Runs grpc_tools.protoc on ``proto_dir``/licensing/v1/licensing.proto into
    a fresh temporary directory (removed when the interpreter exits), puts that
    directory on sys.path and imports the generated modules. The proto imports
    only Google's well-known types (google/protobuf/*.proto); they come from
    the copy bundled with grpcio-tools.

    Returns a namespace with ``pb2`` (messages and enums) and ``pb2_grpc``
    (service stubs). Calling it again with the same directory returns the same
    namespace.
    """
    proto_dir = Path(proto_dir).resolve()
    proto_file = proto_dir / LICENSING_PROTO
    if not proto_file.is_file():
        raise FileNotFoundError(f"{proto_file} not found: is {proto_dir} the proto directory?")
    if proto_dir in _stubs_cache:
        return _stubs_cache[proto_dir]
    if _stubs_cache:
        # The generated modules are named after the proto package, so a
        # second, different copy could not be imported beside the first.
        raise RuntimeError("stubs were already generated from another proto directory")

    from grpc_tools import protoc  # imported here: only stub generation needs it

    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_dir = tempfile.mkdtemp(prefix="licensd-stubs-")
    atexit.register(shutil.rmtree, out_dir, ignore_errors=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={proto_dir}",
        f"--proto_path={well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        LICENSING_PROTO,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {proto_file} (see the messages above)")

    sys.path.insert(0, out_dir)
    importlib.invalidate_caches()
    pb2 = importlib.import_module("licensing.v1.licensing_pb2")
    pb2_grpc = importlib.import_module("licensing.v1.licensing_pb2_grpc")
    stubs = types.SimpleNamespace(pb2=pb2, pb2_grpc=pb2_grpc, out_dir=out_dir)
    _stubs_cache[proto_dir] = stubs
    return stubs


class Refusal(NamedTuple):
    """What a failed call says: its gRPC status code, and the reason and
    metadata of its google.rpc.ErrorInfo (empty when it carries none, e.g. a
    transport error)."""

    code: grpc.StatusCode
    reason: str
    metadata: dict


def decode_refusal(err: grpc.RpcError) -> Refusal:
    """Turns a grpc.RpcError into (code, ErrorInfo reason, ErrorInfo metadata).

    licensd puts a google.rpc.Status in the ``grpc-status-details-bin``
    trailing metadata of every refusal; its details hold one ErrorInfo (domain
    "licensing.v1") and, for field errors, a BadRequest.
    """
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    infos = []
    for key, value in trailers or ():
        if key != STATUS_DETAILS_KEY:
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                infos.append(info)
    # licensd's own ErrorInfo first (domain "licensing.v1"), else any other.
    infos.sort(key=lambda info: info.domain != ERROR_DOMAIN)
    if infos:
        return Refusal(code, infos[0].reason, dict(infos[0].metadata))
    return Refusal(code, "", {})


class Client:
    """A connection to licensd with a bearer token.

    The token (``lsd_…``, from ``licensd token create``) is sent as
    ``authorization: Bearer <token>`` on ProductService and LicenseService
    calls. ActivationService calls send none: there the license key is the
    credential, as for an installed product.
    """

    def __init__(
        self,
        target: str,
        token: Optional[str],
        stubs: types.SimpleNamespace,
        *,
        timeout: float = 10.0,
        channel: Optional[grpc.Channel] = None,
    ):
        self.pb2 = stubs.pb2
        self.timeout = timeout
        self.channel = channel if channel is not None else grpc.insecure_channel(target)
        self._auth = (("authorization", f"Bearer {token}"),) if token else ()
        self.products = stubs.pb2_grpc.ProductServiceStub(self.channel)
        self.licenses = stubs.pb2_grpc.LicenseServiceStub(self.channel)
        self.activation = stubs.pb2_grpc.ActivationServiceStub(self.channel)

    # -- plumbing ----------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Waits until the channel is connected (grpc.FutureTimeoutError if not)."""
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def _billing(self, method, request):
        return method(request, metadata=self._auth, timeout=self.timeout)

    def _device(self, method, request):
        return method(request, timeout=self.timeout)

    # -- ProductService (admin; reads also billing and support) -------------

    def create_product(self, code: str, display_name: str, latest_version: str = "", **policy):
        """Creates a product; ``policy`` takes the other Product fields
        (personal_terms_years, business_terms_years, grace_period_months,
        renewal_basis), each defaulted by the server when omitted."""
        product = self.pb2.Product(
            code=code, display_name=display_name, latest_version=latest_version, **policy
        )
        return self._billing(
            self.products.CreateProduct, self.pb2.CreateProductRequest(product=product)
        )

    def get_product(self, code: str):
        return self._billing(self.products.GetProduct, self.pb2.GetProductRequest(code=code))

    # -- LicenseService (billing, admin; reads also support) ----------------

    def issue_license(
        self,
        request_id: str,
        product: str,
        edition: int,
        seats: int,
        term_years: int,
        **fields,
    ):
        """Issues a license. ``request_id`` is the idempotency key: a retry
        with the same id and payload returns the same license. ``fields``
        takes kind, starts_at, order_ref, customer_ref, reseller."""
        request = self.pb2.IssueLicenseRequest(
            request_id=request_id,
            product=product,
            edition=edition,
            seats=seats,
            term_years=term_years,
            **fields,
        )
        return self._billing(self.licenses.IssueLicense, request)

    def get_license(self, license_key: str):
        return self._billing(
            self.licenses.GetLicense, self.pb2.GetLicenseRequest(license_key=license_key)
        )

    def issue_renewal_code(
        self,
        request_id: str,
        product: str,
        edition: int,
        seats: int,
        term_years: int,
        **fields,
    ):
        """Issues a one-time renewal code (shown in full only in this answer).
        ``fields`` takes order_ref and reseller."""
        request = self.pb2.IssueRenewalCodeRequest(
            request_id=request_id,
            product=product,
            edition=edition,
            seats=seats,
            term_years=term_years,
            **fields,
        )
        return self._billing(self.licenses.IssueRenewalCode, request)

    def get_renewal_code(self, renewal_code: str):
        return self._billing(
            self.licenses.GetRenewalCode,
            self.pb2.GetRenewalCodeRequest(renewal_code=renewal_code),
        )

    def license_events(self, license_key: str, page_size: int = 100) -> Iterator:
        """The license's history, oldest first, across all pages."""
        page_token = ""
        while True:
            page = self._billing(
                self.licenses.ListLicenseEvents,
                self.pb2.ListLicenseEventsRequest(
                    license_key=license_key, page_size=page_size, page_token=page_token
                ),
            )
            yield from page.events
            page_token = page.next_page_token
            if not page_token:
                return

    # -- ActivationService (installed products; no token) -------------------

    def activate(
        self, license_key: str, fingerprint: str, hostname: str = "", client_version: str = ""
    ):
        return self._device(
            self.activation.Activate,
            self.pb2.ActivateRequest(
                license_key=license_key,
                fingerprint=fingerprint,
                hostname=hostname,
                client_version=client_version,
            ),
        )

    def deactivate(self, license_key: str, fingerprint: str):
        return self._device(
            self.activation.Deactivate,
            self.pb2.DeactivateRequest(license_key=license_key, fingerprint=fingerprint),
        )

    def validate(self, license_key: str, fingerprint: str = "", client_version: str = ""):
        return self._device(
            self.activation.Validate,
            self.pb2.ValidateRequest(
                license_key=license_key, fingerprint=fingerprint, client_version=client_version
            ),
        )

    def redeem_renewal_code(
        self, license_key: str, renewal_code: str, fingerprint: str, client_version: str
    ):
        return self._device(
            self.activation.RedeemRenewalCode,
            self.pb2.RedeemRenewalCodeRequest(
                license_key=license_key,
                renewal_code=renewal_code,
                fingerprint=fingerprint,
                client_version=client_version,
            ),
        )


def enum_name(enum_type, value: int) -> str:
    """The name of an enum value, e.g. enum_name(pb2.Validity, 1) == "VALIDITY_VALID"."""
    try:
        return enum_type.Name(value)
    except ValueError:
        return str(value)


__all__: Sequence[str] = (
    "Client",
    "ERROR_DOMAIN",
    "Refusal",
    "decode_refusal",
    "enum_name",
    "generate_stubs",
)
