//! LicenseService.

use tonic::{Request, Response, Status};

use super::convert::{self, field, token};
use super::{Ctx, actor_of, events, refusal_status, status_of};
use crate::domain::Refusal;
use crate::domain::rules::{self, StatusAction, input};
use crate::proto as pb;
use crate::proto::license_service_server::LicenseService;
use crate::store::{IssueLicense, IssueRenewalCode, LicenseFilter};

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
        let (key, reason, request_id) = req.into_inner();
        let parsed = (|| {
            let key = convert::license_key_deferred("license_key", &key)?;
            let reason = field(input::text("reason", &reason, input::MAX_REASON))?;
            let request_id = if request_id.is_empty() {
                None
            } else {
                Some(field(input::request_id("request_id", &request_id))?)
            };
            Ok::<_, Refusal>((key?, reason, request_id))
        })();
        let (key, reason, request_id) = parsed.map_err(|r| refusal_status(&r))?;
        let now = self.ctx.now();
        let license = self
            .ctx
            .store
            .change_status(&key, action, &reason, request_id.as_deref(), &actor, now)
            .await
            .map_err(status_of)?;
        Ok(Response::new(convert::license_to_proto(&license, now)))
    }
}

fn optional_filter(name: &str, v: &str) -> Result<Option<String>, Refusal> {
    if v.is_empty() {
        Ok(None)
    } else {
        field(input::text(name, v, input::MAX_REF)).map(Some)
    }
}

#[tonic::async_trait]
impl LicenseService for LicenseApi {
    async fn issue_license(
        &self,
        req: Request<pb::IssueLicenseRequest>,
    ) -> Result<Response<pb::License>, Status> {
        let actor = actor_of(&req);
        let r = req.into_inner();
        let parsed = (|| {
            let edition = convert::edition("edition", r.edition)?;
            rules::check_seats(r.seats)?;
            rules::check_term_possible(edition, r.term_years)?;
            Ok::<_, Refusal>(IssueLicense {
                request_id: field(input::request_id("request_id", &r.request_id))?,
                product: convert::product_code("product", &r.product)?,
                edition,
                kind: convert::kind("kind", r.kind)?,
                seats: r.seats,
                term_years: r.term_years,
                starts_at: convert::parse_timestamp("starts_at", r.starts_at.as_ref())?,
                order_ref: field(input::text("order_ref", &r.order_ref, input::MAX_REF))?,
                customer_ref: field(input::text("customer_ref", &r.customer_ref, input::MAX_REF))?,
                reseller: field(input::text("reseller", &r.reseller, input::MAX_REF))?,
            })
        })();
        let cmd = parsed.map_err(|r| refusal_status(&r))?;
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
        let r = req.into_inner();
        let parsed = (|| {
            let filter = LicenseFilter {
                product: if r.product.is_empty() {
                    None
                } else {
                    Some(convert::product_code("product", &r.product)?)
                },
                customer_ref: optional_filter("customer_ref", &r.customer_ref)?,
                order_ref: optional_filter("order_ref", &r.order_ref)?,
                expires_after: convert::parse_timestamp("expires_after", r.expires_after.as_ref())?,
                expires_before: convert::parse_timestamp(
                    "expires_before",
                    r.expires_before.as_ref(),
                )?,
            };
            let size = convert::page_size(r.page_size, 50, 500)?;
            let after = token::parse_licenses(&r.page_token)?;
            Ok::<_, Refusal>((filter, size, after))
        })();
        let (filter, size, after) = parsed.map_err(|r| refusal_status(&r))?;
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
        let r = req.into_inner();
        let parsed = (|| {
            let key = convert::license_key_deferred("license_key", &r.license_key)?;
            let size = convert::page_size(r.page_size, 100, 1000)?;
            let after = token::parse_events(&r.page_token)?;
            Ok::<_, Refusal>((key?, size, after))
        })();
        let (key, size, after) = parsed.map_err(|r| refusal_status(&r))?;
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
        let r = req.into_inner();
        let parsed = (|| {
            let edition = convert::edition("edition", r.edition)?;
            rules::check_seats(r.seats)?;
            rules::check_term_possible(edition, r.term_years)?;
            Ok::<_, Refusal>(IssueRenewalCode {
                request_id: field(input::request_id("request_id", &r.request_id))?,
                product: convert::product_code("product", &r.product)?,
                edition,
                seats: r.seats,
                term_years: r.term_years,
                order_ref: field(input::text("order_ref", &r.order_ref, input::MAX_REF))?,
                reseller: field(input::text("reseller", &r.reseller, input::MAX_REF))?,
            })
        })();
        let cmd = parsed.map_err(|r| refusal_status(&r))?;
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
        let r = req.into_inner();
        let parsed = (|| {
            let code = convert::renewal_code("renewal_code", &r.renewal_code)?;
            let reason = field(input::text("reason", &r.reason, input::MAX_REASON))?;
            let request_id = if r.request_id.is_empty() {
                None
            } else {
                Some(field(input::request_id("request_id", &r.request_id))?)
            };
            Ok::<_, Refusal>((code, reason, request_id))
        })();
        let (code, reason, request_id) = parsed.map_err(|r| refusal_status(&r))?;
        let record = self
            .ctx
            .store
            .void_renewal_code(
                &code,
                &reason,
                request_id.as_deref(),
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
