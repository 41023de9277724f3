//! The S3 backend (`aws-sdk-s3`): any S3-compatible server (AWS, SeaweedFS, Ceph RGW).
//!
//! Conditional puts are `If-None-Match: *`; the server answers 412 when the key exists.
//! Integrity is end-to-end (every chunk is addressed by its SHA-256 and verified when
//! read), so the SDK's own request checksums are only sent where S3 requires them.

use crate::store::{check_key, ObjectStore, StoreError};
use aws_sdk_s3::config::{
    BehaviorVersion, Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

/// Where and how to reach an S3 bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    /// `http(s)://host:port` of the S3 endpoint.
    pub endpoint: String,
    pub bucket: String,
    /// Prefix of every key (`""` for none).
    pub prefix: String,
    pub region: String,
    pub access_key: String,
    pub secret_key: String,
}

/// Objects in an S3 bucket, under a key prefix.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    bucket: String,
    prefix: String,
}

fn backend<'a, E: std::error::Error + 'static>(
    op: &'static str,
    key: &'a str,
) -> impl FnOnce(E) -> StoreError + 'a {
    move |e| StoreError::Backend {
        op,
        key: key.to_string(),
        message: DisplayErrorContext(&e).to_string(),
    }
}

/// The service error code of an SDK error (`NoSuchKey`, `PreconditionFailed`, ...).
fn service_code<E: ProvideErrorMetadata, R>(e: &SdkError<E, R>) -> Option<&str> {
    e.as_service_error().and_then(|s| s.code())
}

impl S3Store {
    /// Connects (lazily: no request is made until the first operation).
    pub fn new(config: &S3Config) -> Self {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let conf = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .endpoint_url(&config.endpoint)
            .force_path_style(true)
            .credentials_provider(Credentials::new(
                &config.access_key,
                &config.secret_key,
                None,
                None,
                "nullspace-config",
            ))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .http_client(http)
            .build();
        let prefix = config.prefix.trim_matches('/');
        Self {
            client: Client::from_conf(conf),
            bucket: config.bucket.clone(),
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
        }
    }

    /// Creates the bucket if it does not exist; fails with the server's reason if it
    /// cannot be reached.
    pub async fn ensure_bucket(&self) -> Result<(), StoreError> {
        if self
            .client
            .head_bucket()
            .bucket(&self.bucket)
            .send()
            .await
            .is_ok()
        {
            return Ok(());
        }
        match self
            .client
            .create_bucket()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                if matches!(
                    service_code(&e),
                    Some("BucketAlreadyOwnedByYou" | "BucketAlreadyExists")
                ) {
                    Ok(())
                } else {
                    Err(backend("create bucket", &self.bucket)(e))
                }
            }
        }
    }

    fn full_key(&self, key: &str) -> Result<String, StoreError> {
        check_key(key)?;
        Ok(format!("{}{key}", self.prefix))
    }
}

impl ObjectStore for S3Store {
    async fn put(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .body(ByteStream::from(data))
            .send()
            .await
            .map_err(backend("put", key))?;
        Ok(())
    }

    async fn put_if_absent(&self, key: &str, data: bytes::Bytes) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        match self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(full)
            .if_none_match("*")
            .body(ByteStream::from(data))
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let precondition = matches!(
                    service_code(&e),
                    Some("PreconditionFailed" | "ConditionalRequestConflict")
                ) || e.raw_response().map(|r| r.status().as_u16()) == Some(412);
                if precondition {
                    Err(StoreError::AlreadyExists(key.to_string()))
                } else {
                    Err(backend("conditional put", key)(e))
                }
            }
        }
    }

    async fn get(&self, key: &str) -> Result<bytes::Bytes, StoreError> {
        let full = self.full_key(key)?;
        let out = match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(out) => out,
            Err(e) => {
                let not_found = e.as_service_error().is_some_and(|s| s.is_no_such_key())
                    || e.raw_response().map(|r| r.status().as_u16()) == Some(404);
                return Err(if not_found {
                    StoreError::NotFound(key.to_string())
                } else {
                    backend("get", key)(e)
                });
            }
        };
        let body = out.body.collect().await.map_err(backend("read", key))?;
        Ok(body.into_bytes())
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let full = self.full_key(key)?;
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
        {
            Ok(_) => Ok(true),
            Err(e) => {
                let not_found = e.as_service_error().is_some_and(|s| s.is_not_found())
                    || e.raw_response().map(|r| r.status().as_u16()) == Some(404);
                if not_found {
                    Ok(false)
                } else {
                    Err(backend("head", key)(e))
                }
            }
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(format!("{}{prefix}", self.prefix))
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(backend("list", prefix))?;
            for obj in page.contents() {
                if let Some(k) = obj.key().and_then(|k| k.strip_prefix(&self.prefix)) {
                    out.push(k.to_string());
                }
            }
            match page.next_continuation_token() {
                Some(t) if page.is_truncated() == Some(true) => token = Some(t.to_string()),
                _ => break,
            }
        }
        out.sort();
        Ok(out)
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let full = self.full_key(key)?;
        self.client
            .delete_object()
            .bucket(&self.bucket)
            .key(full)
            .send()
            .await
            .map_err(backend("delete", key))?;
        Ok(())
    }
}
