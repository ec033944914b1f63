//! ProductService.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{self, token};
use super::{Ctx, refusal_status, request, status_of};
use crate::proto as pb;
use crate::proto::product_service_server::ProductService;
use crate::store::ProductUpdate;

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

#[tonic::async_trait]
impl ProductService for ProductApi {
    async fn create_product(
        &self,
        req: Request<pb::CreateProductRequest>,
    ) -> Result<Response<pb::Product>, Status> {
        let product = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
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
        let request::ListProducts { size, after } =
            request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
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
        let cmd = request::parse(req.get_ref()).map_err(|r| refusal_status(&r))?;
        let code = cmd.code.clone();
        let apply: ProductUpdate = Arc::new(move |cur| cmd.apply(cur));
        let updated = self
            .ctx
            .store
            .update_product(&code, apply, self.ctx.now())
            .await
            .map_err(status_of)?;
        Ok(Response::new(convert::product_to_proto(&updated)))
    }
}
