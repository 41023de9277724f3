//! The S3 backend against a real S3 server (SeaweedFS, `NULLSPACE_TEST_S3`): the object
//! store contract, conditional writes, and chunked files with verification.

use nullspace_tests::s3_endpoint;
use storage::{restore_file, upload_file, ObjectStore, S3Config, S3Store, StoreError};

fn store(prefix: &str) -> S3Store {
    S3Store::new(&S3Config {
        endpoint: s3_endpoint(),
        bucket: format!("t-store-{}", std::process::id()),
        prefix: prefix.to_string(),
        region: "us-east-1".into(),
        access_key: "nullspace-test".into(),
        secret_key: "nullspace-test".into(),
    })
}

#[tokio::test]
async fn objects_round_trip_and_conditional_puts_commit_once() {
    let s = store("contract");
    s.ensure_bucket().await.unwrap();
    s.ensure_bucket().await.expect("a second ensure is fine");

    s.put("a/one", "first".into()).await.unwrap();
    s.put("a/one", "second".into()).await.unwrap();
    assert_eq!(s.get("a/one").await.unwrap(), "second");
    assert!(s.exists("a/one").await.unwrap());
    assert!(!s.exists("a/none").await.unwrap());
    assert!(matches!(
        s.get("a/none").await,
        Err(StoreError::NotFound(_))
    ));

    s.put_if_absent("a/manifest", "v1".into()).await.unwrap();
    let again = s.put_if_absent("a/manifest", "v2".into()).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists(_))),
        "{again:?}"
    );
    assert_eq!(s.get("a/manifest").await.unwrap(), "v1");

    // Listing is by prefix, sorted, with this store's own prefix stripped; another
    // prefix in the same bucket is another namespace.
    s.put("a/two", bytes::Bytes::new()).await.unwrap();
    s.put("b/three", "x".into()).await.unwrap();
    assert_eq!(
        s.list("a/").await.unwrap(),
        ["a/manifest", "a/one", "a/two"]
    );
    assert!(store("elsewhere").list("a/").await.unwrap().is_empty());

    s.delete("a/one").await.unwrap();
    s.delete("a/one")
        .await
        .expect("deleting an absent key is fine");
    assert!(!s.exists("a/one").await.unwrap());
    assert!(matches!(
        s.put("../escape", "x".into()).await,
        Err(StoreError::InvalidKey(_))
    ));
}

#[tokio::test]
async fn chunked_files_dedup_and_a_corrupted_chunk_is_caught() {
    let s = store("chunks");
    s.ensure_bucket().await.unwrap();
    let dir = nullspace_tests::ScratchDir::new("s3-chunks");
    let src = dir.path().join("src");
    // 3 MiB of data, a 2 MiB hole, 1 MiB of data.
    let file = std::fs::File::create(&src).unwrap();
    file.set_len(6 << 20).unwrap();
    use std::os::unix::fs::FileExt;
    let data: Vec<u8> = (0..(3u32 << 20)).map(|i| (i % 253) as u8).collect();
    file.write_all_at(&data, 0).unwrap();
    file.write_all_at(&data[..1 << 20], 5 << 20).unwrap();
    drop(file);

    let (manifest, stats) = upload_file(&s, &src).await.unwrap();
    assert_eq!(manifest.chunks.len(), 4);
    assert_eq!(stats.skipped, 2, "the hole is not stored");
    let (_, again) = upload_file(&s, &src).await.unwrap();
    assert_eq!((again.uploaded, again.reused), (0, 4), "{again:?}");

    let back = dir.path().join("back");
    restore_file(&s, &manifest, &back).await.unwrap();
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());

    // Damage one chunk in the bucket: the restore says which, and leaves nothing.
    let victim = manifest.chunks[1].key();
    s.put(&victim, "not the chunk".into()).await.unwrap();
    let damaged = dir.path().join("damaged");
    let err = restore_file(&s, &manifest, &damaged).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt { key, .. } if *key == victim),
        "{err}"
    );
    assert!(!damaged.exists());
}
