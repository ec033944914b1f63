//! ActivationService: called by installed products; the license key is the
//! credential. Validate is the hot path: one read, no write.

use tonic::{Request, Response, Status};

use super::{Ctx, actor_of, auth, convert, refusal_status, request, status_of};
use crate::domain::certificate::{CertificateFacts, certificate_lifetime, worth_sending};
use crate::domain::rules;
use crate::domain::{License, LicenseKey, Refusal, Validity};
use crate::proto as pb;
use crate::proto::activation_service_server::ActivationService;
use crate::store::ValidationView;

/// The ActivationService implementation.
pub struct ActivationApi {
    ctx: Ctx,
}

impl ActivationApi {
    /// A service over `ctx`.
    pub fn new(ctx: Ctx) -> Self {
        ActivationApi { ctx }
    }

    /// The offline certificate for `fingerprint` on the license `view`
    /// describes ("" when it gets none, or when the one it holds, expiring
    /// at `held`, is good enough: [`worth_sending`]).
    fn certificate(
        &self,
        key: &LicenseKey,
        view: &ValidationView,
        fingerprint: &str,
        held: Option<i64>,
        now: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let facts = CertificateFacts {
            key,
            standing: view.standing,
            edition: view.edition,
            seats: view.seats,
            latest_version: view.latest_version.as_deref(),
            offline_lease_days: view.offline_lease_days,
            fingerprint,
            fingerprint_bound: view.fingerprint_bound == Some(true),
        };
        if held.is_some()
            && certificate_lifetime(&facts, now)
                .is_none_or(|(_, exp)| !worth_sending(held, exp, facts.offline_lease_days))
        {
            return String::new();
        }
        self.ctx.keys.certificate(&facts, now).unwrap_or_default()
    }

    /// The certificate after a write that bound or renewed `fingerprint`,
    /// of the license as the write left it (the same view Validate reads,
    /// without reading it again).
    fn certificate_after_write(
        &self,
        license: &License,
        fingerprint: &str,
        now: chrono::DateTime<chrono::Utc>,
    ) -> String {
        let view = ValidationView::of_license(license, Some(fingerprint));
        self.certificate(&license.key, &view, fingerprint, None, now)
    }
}

fn validity_only(v: Validity) -> pb::ValidateResponse {
    pb::ValidateResponse {
        validity: convert::validity_to_proto(v) as i32,
        ..Default::default()
    }
}

#[tonic::async_trait]
impl ActivationService for ActivationApi {
    async fn activate(
        &self,
        req: Request<pb::ActivateRequest>,
    ) -> Result<Response<pb::ActivateResponse>, Status> {
        let actor = actor_of(&req);
        let cmd = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let now = self.ctx.now();
        let client_version = cmd
            .client_version
            .map(|v| v.to_string())
            .unwrap_or_default();
        let (license, activation) = self
            .ctx
            .store
            .activate(
                &cmd.key,
                &cmd.fingerprint,
                &cmd.hostname,
                &client_version,
                &actor,
                now,
            )
            .await
            .map_err(status_of)?;
        crate::observe::count(crate::observe::Business::Activation);
        let license_certificate = self.certificate_after_write(&license, &cmd.fingerprint, now);
        Ok(Response::new(pb::ActivateResponse {
            license: Some(convert::license_to_proto(&license, now)),
            activation: Some(convert::activation_to_proto(&activation)),
            license_certificate,
        }))
    }

    async fn deactivate(
        &self,
        req: Request<pb::DeactivateRequest>,
    ) -> Result<Response<pb::DeactivateResponse>, Status> {
        let actor = actor_of(&req);
        let cmd = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let now = self.ctx.now();
        let license = self
            .ctx
            .store
            .deactivate(&cmd.key, &cmd.fingerprint, &actor, now)
            .await
            .map_err(status_of)?;
        crate::observe::count(crate::observe::Business::Deactivation);
        Ok(Response::new(pb::DeactivateResponse {
            license: Some(convert::license_to_proto(&license, now)),
        }))
    }

    async fn validate(
        &self,
        req: Request<pb::ValidateRequest>,
    ) -> Result<Response<pb::ValidateResponse>, Status> {
        let request::Validate {
            key,
            fingerprint,
            client_version,
            held,
        } = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        // A renewal code in the key's place is answered, not refused (R8).
        let Some(key) = key else {
            return Ok(Response::new(validity_only(Validity::RenewalCode)));
        };

        let view = self
            .ctx
            .store
            .validation_view(&key, fingerprint.as_deref())
            .await
            .map_err(status_of)?;
        let Some(view) = view else {
            return Ok(Response::new(validity_only(Validity::NotFound)));
        };
        let now = self.ctx.now();
        let answer = rules::validate(
            &view.standing,
            view.fingerprint_bound,
            client_version.as_ref(),
            view.latest_version.as_deref(),
            now,
        );
        let license_certificate = match &fingerprint {
            Some(fp) if answer.validity == Validity::Valid => {
                self.certificate(&key, &view, fp, held, now)
            }
            _ => String::new(),
        };
        Ok(Response::new(pb::ValidateResponse {
            validity: convert::validity_to_proto(answer.validity) as i32,
            valid: answer.validity == Validity::Valid,
            kind: convert::kind_to_proto(view.standing.kind) as i32,
            edition: convert::edition_to_proto(view.edition) as i32,
            expires_at: Some(convert::timestamp(view.standing.expires_at)),
            renewable_until: view.standing.renewable_until().map(convert::timestamp),
            seats: view.seats,
            seats_used: view.seats_used,
            latest_version: view
                .latest_version
                .map(|v| v.as_str().to_string())
                .unwrap_or_default(),
            update_available: answer.update_available,
            license_certificate,
        }))
    }

    async fn redeem_renewal_code(
        &self,
        req: Request<pb::RedeemRenewalCodeRequest>,
    ) -> Result<Response<pb::RedeemRenewalCodeResponse>, Status> {
        let actor = actor_of(&req);
        let cmd = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        // Guessing codes is throttled per license key: attempts with a code
        // that does not exist count (a real code refused for another reason,
        // e.g. an outdated client, is an honest mistake, not a guess).
        let throttle_key = cmd.license_key.normalized().to_string();
        if let Err(wait) = self.ctx.code_failures.check(&throttle_key) {
            return Err(auth::exhausted(
                "TOO_MANY_FAILED_RENEWAL_ATTEMPTS",
                "too many failed renewal-code attempts for this license; retry later",
                wait,
            ));
        }
        let now = self.ctx.now();
        let result = self.ctx.store.redeem(&cmd, &actor, now).await;
        let (license, previous) = result.map_err(|e| {
            if matches!(
                e,
                crate::store::StoreError::Refused(Refusal::RenewalCodeNotFound)
            ) {
                self.ctx.code_failures.record(&throttle_key);
            }
            tracing::info!(key = %cmd.license_key.redacted(), error = %e, "renewal refused");
            status_of(e)
        })?;
        tracing::info!(key = %license.key.redacted(), "license renewed");
        crate::observe::count(crate::observe::Business::Renewal);
        let license_certificate = self.certificate_after_write(&license, &cmd.fingerprint, now);
        Ok(Response::new(pb::RedeemRenewalCodeResponse {
            license: Some(convert::license_to_proto(&license, now)),
            previous_expires_at: Some(convert::timestamp(previous)),
            license_certificate,
        }))
    }

    async fn get_signing_keys(
        &self,
        _req: Request<pb::GetSigningKeysRequest>,
    ) -> Result<Response<pb::GetSigningKeysResponse>, Status> {
        Ok(Response::new(pb::GetSigningKeysResponse {
            jwks: self.ctx.keys.jwks(),
        }))
    }
}
