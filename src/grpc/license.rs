//! LicenseService.

use tonic::{Request, Response, Status};

use super::convert::{self, token};
use super::{Ctx, actor_of, events, refusal_status, request, status_of};
use crate::domain::rules::StatusAction;
use crate::proto as pb;
use crate::proto::license_service_server::LicenseService;

/// The LicenseService implementation.
pub struct LicenseApi {
    ctx: Ctx,
}

impl LicenseApi {
    /// A service over `ctx`.
    pub fn new(ctx: Ctx) -> Self {
        LicenseApi { ctx }
    }

    async fn change_status(
        &self,
        req: Request<(String, String, String)>,
        action: StatusAction,
    ) -> Result<Response<pb::License>, Status> {
        let actor = actor_of(&req);
        let (key, reason, request_id) = req.get_ref();
        let cmd =
            request::change_status(key, reason, request_id).map_err(|r| refusal_status(&r))?;
        let now = self.ctx.now();
        let license = self
            .ctx
            .store
            .change_status(
                &cmd.key,
                action,
                &cmd.reason,
                cmd.request_id.as_deref(),
                &actor,
                now,
            )
            .await
            .map_err(status_of)?;
        Ok(Response::new(convert::license_to_proto(&license, now)))
    }
}

#[tonic::async_trait]
impl LicenseService for LicenseApi {
    async fn issue_license(
        &self,
        req: Request<pb::IssueLicenseRequest>,
    ) -> Result<Response<pb::License>, Status> {
        let actor = actor_of(&req);
        let cmd = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let now = self.ctx.now();
        let license = self
            .ctx
            .store
            .issue_license(&cmd, &actor, now)
            .await
            .map_err(status_of)?;
        tracing::info!(key = %license.key.redacted(), product = %license.product, "license issued");
        crate::observe::count(crate::observe::Business::LicenseIssued);
        Ok(Response::new(convert::license_to_proto(&license, now)))
    }

    async fn get_license(
        &self,
        req: Request<pb::GetLicenseRequest>,
    ) -> Result<Response<pb::License>, Status> {
        let key = convert::license_key("license_key", &req.get_ref().license_key)
            .map_err(|r| refusal_status(&r))?;
        let license = self.ctx.store.get_license(&key).await.map_err(status_of)?;
        Ok(Response::new(convert::license_to_proto(
            &license,
            self.ctx.now(),
        )))
    }

    async fn list_licenses(
        &self,
        req: Request<pb::ListLicensesRequest>,
    ) -> Result<Response<pb::ListLicensesResponse>, Status> {
        let request::ListLicenses {
            filter,
            size,
            after,
        } = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let mut rows = self
            .ctx
            .store
            .list_licenses(&filter, after, size + 1)
            .await
            .map_err(status_of)?;
        let next_page_token = if rows.len() > size as usize {
            rows.truncate(size as usize);
            rows.last()
                .map(|(_, c)| token::licenses(*c))
                .unwrap_or_default()
        } else {
            String::new()
        };
        let now = self.ctx.now();
        Ok(Response::new(pb::ListLicensesResponse {
            licenses: rows
                .iter()
                .map(|(l, _)| convert::license_to_proto(l, now))
                .collect(),
            next_page_token,
        }))
    }

    async fn suspend_license(
        &self,
        req: Request<pb::SuspendLicenseRequest>,
    ) -> Result<Response<pb::License>, Status> {
        let req = req.map(|r| (r.license_key, r.reason, r.request_id));
        self.change_status(req, StatusAction::Suspend).await
    }

    async fn reinstate_license(
        &self,
        req: Request<pb::ReinstateLicenseRequest>,
    ) -> Result<Response<pb::License>, Status> {
        let req = req.map(|r| (r.license_key, r.reason, r.request_id));
        self.change_status(req, StatusAction::Reinstate).await
    }

    async fn revoke_license(
        &self,
        req: Request<pb::RevokeLicenseRequest>,
    ) -> Result<Response<pb::License>, Status> {
        let req = req.map(|r| (r.license_key, r.reason, r.request_id));
        self.change_status(req, StatusAction::Revoke).await
    }

    async fn list_license_events(
        &self,
        req: Request<pb::ListLicenseEventsRequest>,
    ) -> Result<Response<pb::ListLicenseEventsResponse>, Status> {
        let request::ListLicenseEvents { key, size, after } =
            request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let mut events = self
            .ctx
            .store
            .list_events(&key, after, size + 1)
            .await
            .map_err(status_of)?;
        let next_page_token = if events.len() > size as usize {
            events.truncate(size as usize);
            events
                .last()
                .map(|e| token::events(e.id))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListLicenseEventsResponse {
            events: events.iter().map(convert::event_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn list_events(
        &self,
        req: Request<pb::ListEventsRequest>,
    ) -> Result<Response<pb::ListEventsResponse>, Status> {
        let r = req.into_inner();
        let size = convert::page_size(r.page_size, 100, 1000).map_err(|r| refusal_status(&r))?;
        let feed = events::parse(&self.ctx, &r.after, &r.product, &r.event_types).await?;
        let page = self
            .ctx
            .store
            .list_feed(feed.after, &feed.filter, size)
            .await
            .map_err(status_of)?;
        Ok(Response::new(pb::ListEventsResponse {
            events: page.events.iter().map(convert::event_to_proto).collect(),
            next_cursor: token::feed(page.next),
        }))
    }

    type WatchEventsStream = events::WatchStream;

    async fn watch_events(
        &self,
        req: Request<pb::WatchEventsRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        let r = req.into_inner();
        let feed = events::parse(&self.ctx, &r.after, &r.product, &r.event_types).await?;
        let watch = self.ctx.store.watch_feed(feed.after, feed.filter);
        Ok(Response::new(events::WatchStream::new(watch)))
    }

    async fn issue_renewal_code(
        &self,
        req: Request<pb::IssueRenewalCodeRequest>,
    ) -> Result<Response<pb::RenewalCode>, Status> {
        let actor = actor_of(&req);
        let cmd = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let (record, code) = self
            .ctx
            .store
            .issue_renewal_code(&cmd, &actor, self.ctx.now())
            .await
            .map_err(status_of)?;
        tracing::info!(code_id = %record.id, product = %record.product, "renewal code issued");
        crate::observe::count(crate::observe::Business::CodeIssued);
        Ok(Response::new(convert::code_to_proto(&record, Some(&code))))
    }

    async fn get_renewal_code(
        &self,
        req: Request<pb::GetRenewalCodeRequest>,
    ) -> Result<Response<pb::RenewalCode>, Status> {
        let code = convert::renewal_code("renewal_code", &req.get_ref().renewal_code)
            .map_err(|r| refusal_status(&r))?;
        let record = self
            .ctx
            .store
            .get_renewal_code(&code)
            .await
            .map_err(status_of)?;
        Ok(Response::new(convert::code_to_proto(&record, None)))
    }

    async fn void_renewal_code(
        &self,
        req: Request<pb::VoidRenewalCodeRequest>,
    ) -> Result<Response<pb::RenewalCode>, Status> {
        let actor = actor_of(&req);
        let cmd = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let record = self
            .ctx
            .store
            .void_renewal_code(
                &cmd.code,
                &cmd.reason,
                cmd.request_id.as_deref(),
                &actor,
                self.ctx.now(),
            )
            .await
            .map_err(status_of)?;
        tracing::info!(code_id = %record.id, "renewal code voided");
        crate::observe::count(crate::observe::Business::CodeVoided);
        Ok(Response::new(convert::code_to_proto(&record, None)))
    }
}
