//! ProductService.

use tonic::{Request, Response, Status};

use super::convert::{self, invalid, token};
use super::{Ctx, refusal_status, status_of};
use crate::domain::product::ProductSpec;
use crate::domain::{Product, Refusal};
use crate::proto as pb;
use crate::proto::product_service_server::ProductService;

/// The ProductService implementation.
pub struct ProductApi {
    ctx: Ctx,
}

impl ProductApi {
    /// A service over `ctx`.
    pub fn new(ctx: Ctx) -> Self {
        ProductApi { ctx }
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
        renewal_basis: convert::renewal_basis("product.renewal_basis", p.renewal_basis)?,
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

#[tonic::async_trait]
impl ProductService for ProductApi {
    async fn create_product(
        &self,
        req: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let req = req.into_inner();
        let parsed = (|| {
            let p = req
                .product
                .as_ref()
                .ok_or_else(|| invalid("product", "is required"))?;
            let code = convert::product_code("product.code", &p.code)?;
            Product::new(code, spec_of(p)?).map_err(Refusal::InvalidField)
        })();
        let product = parsed.map_err(|r| refusal_status(&r))?;
        let created = self
            .ctx
            .store
            .create_product(&product, self.ctx.now())
            .await
            .map_err(status_of)?;
        Ok(Response::new(convert::product_to_proto(&created)))
    }

    async fn get_product(
        &self,
        req: Request<pb::GetProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let code =
            convert::product_code("code", &req.get_ref().code).map_err(|r| refusal_status(&r))?;
        let product = self.ctx.store.get_product(&code).await.map_err(status_of)?;
        Ok(Response::new(convert::product_to_proto(&product)))
    }

    async fn list_products(
        &self,
        req: Request<pb::ListProductsRequest>,
    ) -> Result<Response<pb::ListProductsResponse>, Status> {
        let req = req.into_inner();
        let size = convert::page_size(req.page_size, 50, 500).map_err(|r| refusal_status(&r))?;
        let after = token::parse_products(&req.page_token).map_err(|r| refusal_status(&r))?;
        let after = after
            .map(|a| convert::product_code("page_token", &a))
            .transpose()
            .map_err(|r| refusal_status(&r))?;
        let mut products = self
            .ctx
            .store
            .list_products(after.as_ref(), size + 1)
            .await
            .map_err(status_of)?;
        let next_page_token = if products.len() > size as usize {
            products.truncate(size as usize);
            products
                .last()
                .map(|p| token::products(p.code().as_str()))
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListProductsResponse {
            products: products.iter().map(convert::product_to_proto).collect(),
            next_page_token,
        }))
    }

    async fn update_product(
        &self,
        req: Request<pb::UpdateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let req = req.into_inner();
        let parsed = (|| {
            let p = req
                .product
                .clone()
                .ok_or_else(|| invalid("product", "is required"))?;
            let code = convert::product_code("product.code", &p.code)?;
            let paths = update_paths(&p, req.update_mask.as_ref())?;
            let new = spec_of(&p)?;
            Ok::<_, Refusal>((code, paths, new))
        })();
        let (code, paths, new) = parsed.map_err(|r| refusal_status(&r))?;
        let apply = move |mut cur: ProductSpec| {
            for path in &paths {
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
        };
        let updated = self
            .ctx
            .store
            .update_product(&code, &apply, self.ctx.now())
            .await
            .map_err(status_of)?;
        Ok(Response::new(convert::product_to_proto(&updated)))
    }
}
