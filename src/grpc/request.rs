//! Each request parsed into the command its handler runs (proto → domain):
//! one [`Parse`] implementation per request, built from the field conversions
//! of [`convert`](super::convert). A handler reads `request::parse(&r)`, asks
//! the store, and converts the answer.

use super::convert::{
    edition, field, invalid, kind, license_key_deferred, page_size, parse_timestamp, product_code,
    renewal_basis, renewal_code, token,
};
use crate::domain::product::ProductSpec;
use crate::domain::rules::{self, input};
use crate::domain::{
    Edition, LicenseKey, ParseError, Product, ProductCode, Refusal, RenewalCode, Version,
};
use crate::proto as pb;
use crate::store::{IssueLicense, IssueRenewalCode, LicenseCursor, LicenseFilter, Redeem};

/// A request parsed into the command its handler runs: every field checked in
/// the contract's order, the first bad one refused naming it. A handler calls
/// [`parse`], asks the store, and converts the answer.
pub trait Parse {
    /// What the request asks for, in domain values.
    type Command;
    /// Checks every field; see [`Parse`].
    fn parse(&self) -> Result<Self::Command, Refusal>;
}

/// Parses `request` into its command ([`Parse`]).
pub fn parse<R: Parse>(request: &R) -> Result<R::Command, Refusal> {
    request.parse()
}

fn optional_version(name: &str, v: &str) -> Result<Option<Version>, Refusal> {
    if v.is_empty() {
        Ok(None)
    } else {
        Version::parse(v).map(Some).map_err(|e| invalid(name, e))
    }
}

fn optional_request_id(v: &str) -> Result<Option<String>, Refusal> {
    if v.is_empty() {
        Ok(None)
    } else {
        field(input::request_id("request_id", v)).map(Some)
    }
}

fn optional_filter(name: &str, v: &str) -> Result<Option<String>, Refusal> {
    if v.is_empty() {
        Ok(None)
    } else {
        field(input::text(name, v, input::MAX_REF)).map(Some)
    }
}

/// Activate, parsed.
pub struct Activate {
    /// The license.
    pub key: LicenseKey,
    /// The workstation.
    pub fingerprint: String,
    /// Its host name.
    pub hostname: String,
    /// Its version, when it says.
    pub client_version: Option<Version>,
}

impl Parse for pb::ActivateRequest {
    type Command = Activate;
    fn parse(&self) -> Result<Activate, Refusal> {
        let key = license_key_deferred("license_key", &self.license_key)?;
        let fingerprint = field(input::fingerprint("fingerprint", &self.fingerprint))?;
        let hostname = field(input::text("hostname", &self.hostname, input::MAX_HOSTNAME))?;
        let client_version = optional_version("client_version", &self.client_version)?;
        Ok(Activate {
            key: key?,
            fingerprint,
            hostname,
            client_version,
        })
    }
}

/// Deactivate, parsed.
pub struct Deactivate {
    /// The license.
    pub key: LicenseKey,
    /// The workstation to release.
    pub fingerprint: String,
}

impl Parse for pb::DeactivateRequest {
    type Command = Deactivate;
    fn parse(&self) -> Result<Deactivate, Refusal> {
        let key = license_key_deferred("license_key", &self.license_key)?;
        let fingerprint = field(input::fingerprint("fingerprint", &self.fingerprint))?;
        Ok(Deactivate {
            key: key?,
            fingerprint,
        })
    }
}

/// Validate, parsed. Every well-formed value gets an OK answer: a renewal
/// code is answered VALIDITY_RENEWAL_CODE (R8), not refused; only malformed
/// input is an error.
pub struct Validate {
    /// The license; `None` when the value is a renewal code.
    pub key: Option<LicenseKey>,
    /// The workstation, when it says.
    pub fingerprint: Option<String>,
    /// Its version, when it says.
    pub client_version: Option<Version>,
    /// When the certificate it holds expires, in Unix seconds.
    pub held: Option<i64>,
}

impl Parse for pb::ValidateRequest {
    type Command = Validate;
    fn parse(&self) -> Result<Validate, Refusal> {
        let key = match LicenseKey::parse(&self.license_key) {
            Ok(k) => Some(k),
            Err(ParseError::IsRenewalCode) => None,
            Err(_) => {
                return Err(Refusal::MalformedKey {
                    field: "license_key",
                });
            }
        };
        let fingerprint = if self.fingerprint.is_empty() {
            None
        } else {
            Some(field(input::fingerprint("fingerprint", &self.fingerprint))?)
        };
        let client_version = optional_version("client_version", &self.client_version)?;
        let held = parse_timestamp(
            "certificate_expires_at",
            self.certificate_expires_at.as_ref(),
        )?
        .map(|t| t.timestamp());
        Ok(Validate {
            key,
            fingerprint,
            client_version,
            held,
        })
    }
}

impl Parse for pb::RedeemRenewalCodeRequest {
    type Command = Redeem;
    fn parse(&self) -> Result<Redeem, Refusal> {
        let key = license_key_deferred("license_key", &self.license_key)?;
        let code = renewal_code("renewal_code", &self.renewal_code)?;
        let fingerprint = field(input::fingerprint("fingerprint", &self.fingerprint))?;
        let client_version =
            Version::parse(&self.client_version).map_err(|e| invalid("client_version", e))?;
        Ok(Redeem {
            license_key: key?,
            code,
            fingerprint,
            client_version,
        })
    }
}

/// The fields IssueLicense and IssueRenewalCode begin with, checked in the
/// order both follow: edition, seats and term (R1), request id, product.
fn issued(
    edition_value: i32,
    seats: u32,
    term_years: u32,
    request_id: &str,
    product: &str,
) -> Result<(Edition, String, ProductCode), Refusal> {
    let edition = edition("edition", edition_value)?;
    rules::check_seats(seats)?;
    rules::check_term_possible(edition, term_years)?;
    let request_id = field(input::request_id("request_id", request_id))?;
    Ok((edition, request_id, product_code("product", product)?))
}

impl Parse for pb::IssueLicenseRequest {
    type Command = IssueLicense;
    fn parse(&self) -> Result<IssueLicense, Refusal> {
        let r = self;
        let (edition, request_id, product) =
            issued(r.edition, r.seats, r.term_years, &r.request_id, &r.product)?;
        Ok(IssueLicense {
            request_id,
            product,
            edition,
            kind: kind("kind", r.kind)?,
            seats: r.seats,
            term_years: r.term_years,
            starts_at: parse_timestamp("starts_at", r.starts_at.as_ref())?,
            order_ref: field(input::text("order_ref", &r.order_ref, input::MAX_REF))?,
            customer_ref: field(input::text("customer_ref", &r.customer_ref, input::MAX_REF))?,
            reseller: field(input::text("reseller", &r.reseller, input::MAX_REF))?,
        })
    }
}

/// ListLicenses, parsed.
pub struct ListLicenses {
    /// What to list.
    pub filter: LicenseFilter,
    /// Page size.
    pub size: u32,
    /// Where the previous page ended.
    pub after: Option<LicenseCursor>,
}

impl Parse for pb::ListLicensesRequest {
    type Command = ListLicenses;
    fn parse(&self) -> Result<ListLicenses, Refusal> {
        let r = self;
        let filter = LicenseFilter {
            product: if r.product.is_empty() {
                None
            } else {
                Some(product_code("product", &r.product)?)
            },
            customer_ref: optional_filter("customer_ref", &r.customer_ref)?,
            order_ref: optional_filter("order_ref", &r.order_ref)?,
            expires_after: parse_timestamp("expires_after", r.expires_after.as_ref())?,
            expires_before: parse_timestamp("expires_before", r.expires_before.as_ref())?,
        };
        let size = page_size(r.page_size, 50, 500)?;
        let after = token::parse_licenses(&r.page_token)?;
        Ok(ListLicenses {
            filter,
            size,
            after,
        })
    }
}

/// SuspendLicense, ReinstateLicense or RevokeLicense, parsed.
pub struct ChangeStatus {
    /// The license.
    pub key: LicenseKey,
    /// Why, for the history.
    pub reason: String,
    /// Makes a retry harmless, when given.
    pub request_id: Option<String>,
}

/// The fields the three status changes share: the license's key, the
/// reason and the request id.
pub fn change_status(key: &str, reason: &str, request_id: &str) -> Result<ChangeStatus, Refusal> {
    let key = license_key_deferred("license_key", key)?;
    let reason = field(input::text("reason", reason, input::MAX_REASON))?;
    let request_id = optional_request_id(request_id)?;
    Ok(ChangeStatus {
        key: key?,
        reason,
        request_id,
    })
}

/// ListLicenseEvents, parsed.
pub struct ListLicenseEvents {
    /// The license.
    pub key: LicenseKey,
    /// Page size.
    pub size: u32,
    /// After this event id.
    pub after: Option<i64>,
}

impl Parse for pb::ListLicenseEventsRequest {
    type Command = ListLicenseEvents;
    fn parse(&self) -> Result<ListLicenseEvents, Refusal> {
        let key = license_key_deferred("license_key", &self.license_key)?;
        let size = page_size(self.page_size, 100, 1000)?;
        let after = token::parse_events(&self.page_token)?;
        Ok(ListLicenseEvents {
            key: key?,
            size,
            after,
        })
    }
}

impl Parse for pb::IssueRenewalCodeRequest {
    type Command = IssueRenewalCode;
    fn parse(&self) -> Result<IssueRenewalCode, Refusal> {
        let r = self;
        let (edition, request_id, product) =
            issued(r.edition, r.seats, r.term_years, &r.request_id, &r.product)?;
        Ok(IssueRenewalCode {
            request_id,
            product,
            edition,
            seats: r.seats,
            term_years: r.term_years,
            order_ref: field(input::text("order_ref", &r.order_ref, input::MAX_REF))?,
            reseller: field(input::text("reseller", &r.reseller, input::MAX_REF))?,
        })
    }
}

/// VoidRenewalCode, parsed.
pub struct VoidCode {
    /// The code.
    pub code: RenewalCode,
    /// Why, for the history.
    pub reason: String,
    /// Makes a retry harmless, when given.
    pub request_id: Option<String>,
}

impl Parse for pb::VoidRenewalCodeRequest {
    type Command = VoidCode;
    fn parse(&self) -> Result<VoidCode, Refusal> {
        let code = renewal_code("renewal_code", &self.renewal_code)?;
        let reason = field(input::text("reason", &self.reason, input::MAX_REASON))?;
        let request_id = optional_request_id(&self.request_id)?;
        Ok(VoidCode {
            code,
            reason,
            request_id,
        })
    }
}

const UPDATABLE: &[&str] = &[
    "display_name",
    "latest_version",
    "personal_terms_years",
    "business_terms_years",
    "grace_period_months",
    "renewal_basis",
    "offline_lease_days",
];

fn spec_of(p: &pb::Product) -> Result<ProductSpec, Refusal> {
    Ok(ProductSpec {
        display_name: p.display_name.clone(),
        latest_version: p.latest_version.clone(),
        personal_terms: p.personal_terms_years.clone(),
        business_terms: p.business_terms_years.clone(),
        grace_period_months: p.grace_period_months,
        renewal_basis: renewal_basis("product.renewal_basis", p.renewal_basis)?,
        offline_lease_days: p.offline_lease_days,
    })
}

/// The fields an UpdateProduct touches: the mask's paths, or (empty mask)
/// every field set to a non-default value.
fn update_paths(
    p: &pb::Product,
    mask: Option<&prost_types::FieldMask>,
) -> Result<Vec<String>, Refusal> {
    let paths: Vec<String> = mask.map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        let mut set = Vec::new();
        let mut add = |cond: bool, name: &str| {
            if cond {
                set.push(name.to_string())
            }
        };
        add(!p.display_name.is_empty(), "display_name");
        add(!p.latest_version.is_empty(), "latest_version");
        add(!p.personal_terms_years.is_empty(), "personal_terms_years");
        add(!p.business_terms_years.is_empty(), "business_terms_years");
        add(p.grace_period_months.is_some(), "grace_period_months");
        add(p.renewal_basis != 0, "renewal_basis");
        add(p.offline_lease_days.is_some(), "offline_lease_days");
        return Ok(set);
    }
    if paths.len() > UPDATABLE.len() * 2 {
        return Err(invalid(
            "update_mask",
            format!("at most {} paths", UPDATABLE.len() * 2),
        ));
    }
    for path in &paths {
        let name = path.strip_prefix("product.").unwrap_or(path);
        if !UPDATABLE.contains(&name) {
            // The path is not echoed back: it is the caller's text, of any size.
            return Err(invalid(
                "update_mask",
                format!("unknown path; updatable: {}", UPDATABLE.join(", ")),
            ));
        }
    }
    Ok(paths
        .into_iter()
        .map(|p| p.strip_prefix("product.").map(str::to_string).unwrap_or(p))
        .collect())
}

impl Parse for pb::CreateProductRequest {
    type Command = Product;
    fn parse(&self) -> Result<Product, Refusal> {
        let p = self
            .product
            .as_ref()
            .ok_or_else(|| invalid("product", "is required"))?;
        let code = product_code("product.code", &p.code)?;
        Product::new(code, spec_of(p)?).map_err(Refusal::InvalidField)
    }
}

/// ListProducts, parsed.
pub struct ListProducts {
    /// Page size.
    pub size: u32,
    /// The last product of the previous page.
    pub after: Option<ProductCode>,
}

impl Parse for pb::ListProductsRequest {
    type Command = ListProducts;
    fn parse(&self) -> Result<ListProducts, Refusal> {
        let size = page_size(self.page_size, 50, 500)?;
        let after = token::parse_products(&self.page_token)?
            .map(|a| product_code("page_token", &a))
            .transpose()?;
        Ok(ListProducts { size, after })
    }
}

/// UpdateProduct, parsed.
pub struct UpdateProduct {
    /// The product.
    pub code: ProductCode,
    /// The fields to change, without the `product.` prefix.
    paths: Vec<String>,
    /// Their new values.
    new: ProductSpec,
}

impl UpdateProduct {
    /// The product's current values `cur`, with the fields the request
    /// names set to its values.
    pub fn apply(&self, mut cur: ProductSpec) -> ProductSpec {
        let new = &self.new;
        for path in &self.paths {
            match path.as_str() {
                "display_name" => cur.display_name = new.display_name.clone(),
                "latest_version" => cur.latest_version = new.latest_version.clone(),
                "personal_terms_years" => cur.personal_terms = new.personal_terms.clone(),
                "business_terms_years" => cur.business_terms = new.business_terms.clone(),
                "grace_period_months" => cur.grace_period_months = new.grace_period_months,
                "renewal_basis" => cur.renewal_basis = new.renewal_basis,
                "offline_lease_days" => cur.offline_lease_days = new.offline_lease_days,
                _ => {}
            }
        }
        cur
    }
}

impl Parse for pb::UpdateProductRequest {
    type Command = UpdateProduct;
    fn parse(&self) -> Result<UpdateProduct, Refusal> {
        let p = self
            .product
            .as_ref()
            .ok_or_else(|| invalid("product", "is required"))?;
        let code = product_code("product.code", &p.code)?;
        let paths = update_paths(p, self.update_mask.as_ref())?;
        let new = spec_of(p)?;
        Ok(UpdateProduct { code, paths, new })
    }
}
