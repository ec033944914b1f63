//! The ceiling server's ActivationService. `licensd bench` starts a second
//! `licensd serve --validate-ceiling` beside the measured server: the same
//! server stack (transport, layers, codec), but Validate answers a fixed
//! response without parsing the request or reading the store, so the bench
//! can measure what that stack gives at most. The other calls are the real
//! service's. Never run in production.

use tonic::{Request, Response, Status};

use crate::grpc::ActivationApi;
use crate::proto as pb;
use crate::proto::activation_service_server::ActivationService;

/// The real ActivationService, which answers every call but Validate;
/// Validate is answered by [`ceiling_response`].
pub struct ValidateCeiling(pub ActivationApi);

/// The fixed answer of a ceiling server: a VALID license with every field
/// set, the size of a real answer.
fn ceiling_response() -> pb::ValidateResponse {
    let expires = prost_types::Timestamp {
        seconds: 4_102_444_800, // 2100-01-01
        nanos: 0,
    };
    pb::ValidateResponse {
        validity: pb::Validity::Valid as i32,
        valid: true,
        kind: pb::LicenseKind::Standard as i32,
        edition: pb::Edition::Business as i32,
        expires_at: Some(expires),
        renewable_until: Some(prost_types::Timestamp {
            seconds: expires.seconds + 31 * 86_400,
            nanos: 0,
        }),
        seats: 3,
        seats_used: 1,
        latest_version: "1.0.0".into(),
        update_available: false,
        license_certificate: String::new(),
    }
}

#[tonic::async_trait]
impl ActivationService for ValidateCeiling {
    async fn activate(
        &self,
        req: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivateResponse>, Status> {
        self.0.activate(req).await
    }

    async fn deactivate(
        &self,
        req: Request<pb::DeactivateRequest>,
    ) -> Result<Response<pb::DeactivateResponse>, Status> {
        self.0.deactivate(req).await
    }

    async fn validate(
        &self,
        _req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        Ok(Response::new(ceiling_response()))
    }

    async fn redeem_renewal_code(
        &self,
        req: Request<pb::RedeemRenewalCodeRequest>,
    ) -> Result<Response<pb::RedeemRenewalCodeResponse>, Status> {
        self.0.redeem_renewal_code(req).await
    }

    async fn get_signing_keys(
        &self,
        req: Request<pb::GetSigningKeysRequest>,
    ) -> Result<Response<pb::GetSigningKeysResponse>, Status> {
        self.0.get_signing_keys(req).await
    }
}
