//! Adapter files, content-addressed: a blob's key is derived from the SHA-256 of its bytes, so
//! identical uploads share storage, a key always means the same bytes, and corruption is caught
//! on read. Backed by `object_store` (a local directory by default; the same interface serves an
//! S3-compatible store when replicas share blobs).

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use sha2::{Digest, Sha256};

/// Errors of the blob store.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The blob directory could not be created.
    #[error("cannot create blob directory {path}: {source}")]
    CreateDir {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// No blob under this key.
    #[error("blob {key} not found")]
    NotFound { key: String },
    /// The stored bytes no longer hash to their key.
    #[error("blob {key} is corrupt: its bytes hash to {actual}")]
    Corrupt { key: String, actual: String },
    /// Not a key this store hands out.
    #[error("invalid blob key `{0}`")]
    InvalidKey(String),
    /// Backend failure.
    #[error("blob store error: {0}")]
    Backend(#[from] object_store::Error),
}

/// Where a stored blob lives and what it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredBlob {
    /// `sha256/<2 hex>/<64 hex>`.
    pub key: String,
    /// Hex SHA-256 of the bytes.
    pub sha256: String,
    pub size_bytes: u64,
}

/// Handle to the blob store; cheap to clone.
#[derive(Clone, Debug)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
}

impl BlobStore {
    /// A store in a local directory (created when missing).
    pub fn local(dir: &Path) -> Result<BlobStore, BlobError> {
        std::fs::create_dir_all(dir).map_err(|source| BlobError::CreateDir {
            path: dir.to_owned(),
            source,
        })?;
        let fs = LocalFileSystem::new_with_prefix(dir)?.with_automatic_cleanup(true);
        Ok(BlobStore {
            inner: Arc::new(fs),
        })
    }

    /// Any `object_store` backend (S3-compatible stores, in-memory stores in tests).
    pub fn from_object_store(inner: Arc<dyn ObjectStore>) -> BlobStore {
        BlobStore { inner }
    }

    /// The key under which `sha256_hex` is stored.
    pub fn key_for(sha256_hex: &str) -> String {
        format!(
            "sha256/{}/{}",
            &sha256_hex[..2.min(sha256_hex.len())],
            sha256_hex
        )
    }

    /// Stores `bytes` (a no-op when identical bytes are already stored) and returns their key.
    pub async fn put(&self, bytes: Bytes) -> Result<StoredBlob, BlobError> {
        let sha256 = hex::encode(Sha256::digest(&bytes));
        let key = Self::key_for(&sha256);
        let path = ObjectPath::from(key.as_str());
        let size_bytes = bytes.len() as u64;
        if self.inner.head(&path).await.is_err() {
            self.inner.put(&path, PutPayload::from_bytes(bytes)).await?;
        }
        Ok(StoredBlob {
            key,
            sha256,
            size_bytes,
        })
    }

    /// Reads a blob and checks that its bytes still match its key.
    pub async fn get(&self, key: &str) -> Result<Bytes, BlobError> {
        let expected = Self::parse_key(key)?;
        let bytes = match self.inner.get(&ObjectPath::from(key)).await {
            Ok(r) => r.bytes().await?,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(BlobError::NotFound { key: key.into() });
            }
            Err(e) => return Err(e.into()),
        };
        let actual = hex::encode(Sha256::digest(&bytes));
        if actual != expected {
            return Err(BlobError::Corrupt {
                key: key.into(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Whether a blob exists under `key`.
    pub async fn exists(&self, key: &str) -> Result<bool, BlobError> {
        Self::parse_key(key)?;
        match self.inner.head(&ObjectPath::from(key)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes a blob; deleting a missing blob is not an error. Callers check first that no
    /// adapter version still references it, under the blob's lock (`Store::lock_blob`).
    pub async fn delete(&self, key: &str) -> Result<(), BlobError> {
        Self::parse_key(key)?;
        match self.inner.delete(&ObjectPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Every stored blob with its last modification time (for sweeps of unreferenced blobs).
    /// Objects that are not blobs of this store are skipped.
    pub async fn list(&self) -> Result<Vec<(String, time::OffsetDateTime)>, BlobError> {
        use futures_util::TryStreamExt;
        let metas: Vec<object_store::ObjectMeta> = self
            .inner
            .list(Some(&ObjectPath::from("sha256")))
            .try_collect()
            .await?;
        Ok(metas
            .into_iter()
            .filter(|meta| Self::parse_key(meta.location.as_ref()).is_ok())
            .map(|meta| {
                let modified =
                    time::OffsetDateTime::from_unix_timestamp(meta.last_modified.timestamp())
                        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
                (meta.location.to_string(), modified)
            })
            .collect())
    }

    /// The hex digest inside a well-formed key.
    fn parse_key(key: &str) -> Result<&str, BlobError> {
        let bad = || BlobError::InvalidKey(key.chars().take(100).collect());
        let rest = key.strip_prefix("sha256/").ok_or_else(bad)?;
        let (shard, digest) = rest.split_once('/').ok_or_else(bad)?;
        let is_hex = |s: &str| s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if digest.len() != 64 || !is_hex(digest) || shard != &digest[..2] {
            return Err(bad());
        }
        Ok(digest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_round_trip_with_content_addressing() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(dir.path()).unwrap();
        let a = blobs.put(Bytes::from_static(b"weights")).await.unwrap();
        let again = blobs.put(Bytes::from_static(b"weights")).await.unwrap();
        assert_eq!(a, again, "same bytes, same key");
        assert_eq!(a.size_bytes, 7);
        assert_eq!(a.sha256, hex::encode(Sha256::digest(b"weights")));
        assert_eq!(
            blobs.get(&a.key).await.unwrap(),
            Bytes::from_static(b"weights")
        );
        assert!(blobs.exists(&a.key).await.unwrap());
        blobs.delete(&a.key).await.unwrap();
        blobs.delete(&a.key).await.unwrap();
        assert!(!blobs.exists(&a.key).await.unwrap());
        assert!(matches!(
            blobs.get(&a.key).await,
            Err(BlobError::NotFound { .. })
        ));
    }

    #[tokio::test]
    async fn corrupted_blob_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(dir.path()).unwrap();
        let a = blobs.put(Bytes::from_static(b"original")).await.unwrap();
        std::fs::write(dir.path().join(&a.key), b"tampered").unwrap();
        assert!(matches!(
            blobs.get(&a.key).await,
            Err(BlobError::Corrupt { .. })
        ));
    }

    #[tokio::test]
    async fn keys_that_escape_the_store_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let blobs = BlobStore::local(dir.path()).unwrap();
        for bad in ["../etc/passwd", "sha256/zz/abc", "sha256/00/../../x", ""] {
            assert!(
                matches!(blobs.get(bad).await, Err(BlobError::InvalidKey(_))),
                "{bad}"
            );
        }
    }
}
