use super::*;
use sha2::Digest as _;

fn digest_of(b: &[u8]) -> Digest {
    Digest::from_sha256(&sha2::Sha256::digest(b))
}

fn put(store: &Store, data: &[u8]) -> Digest {
    let d = digest_of(data);
    let tmp = store.partial_path(&d);
    std::fs::write(&tmp, data).unwrap();
    store
        .commit(
            &d,
            &tmp,
            &d,
            data.len() as u64,
            Some(data.len() as u64),
            None,
        )
        .unwrap();
    d
}

#[test]
fn commit_verifies_and_recovery_rebuilds_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 1 << 20).unwrap();
    let d = put(&store, b"hello");
    assert!(store.contains(&d));
    let wrong = digest_of(b"other");
    let tmp = store.partial_path(&wrong);
    std::fs::write(&tmp, b"hello").unwrap();
    let err = store
        .commit(&wrong, &tmp, &d, 5, Some(5), None)
        .unwrap_err();
    assert!(matches!(err, StoreError::Mismatch { .. }));
    assert!(!tmp.exists(), "mismatched data must be discarded");
    assert!(!store.contains(&wrong));

    // A crash leftover in tmp/ and a stray file in blobs/.
    std::fs::write(dir.path().join("tmp/garbage"), b"x").unwrap();
    std::fs::write(dir.path().join("blobs/sha256/not-a-digest"), b"x").unwrap();
    std::fs::write(store.partial_path(&wrong), b"hel").unwrap();
    drop(store);
    let (store, rec) = Store::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(rec.blobs, 1);
    assert_eq!(rec.bytes, 5);
    assert_eq!(rec.partials, 1);
    assert_eq!(rec.removed, 2);
    assert!(store.contains(&d));
    assert_eq!(store.usage().bytes, 5);
}

#[test]
fn lru_eviction_skips_blobs_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 10).unwrap();
    let a = put(&store, b"aaaa");
    let b = put(&store, b"bbbb");
    let held = store.open_blob(&a).unwrap().unwrap(); // a is now most recent and in use
    let c = put(&store, b"cccc"); // 12 bytes > 10: evict the LRU that is not read
    assert!(store.contains(&a));
    assert!(!store.contains(&b));
    assert!(store.contains(&c));
    // Touch c, then drop the lease on a: a is least recent but was in use.
    drop(store.open_blob(&c).unwrap());
    let d = put(&store, b"dddd");
    assert!(store.contains(&a), "a is still held");
    assert!(!store.contains(&c));
    assert!(store.contains(&d));
    drop(held);
    assert_eq!(store.usage().bytes, 8);
    let e = put(&store, b"eeee");
    assert!(!store.contains(&a));
    assert!(store.contains(&e));
    assert!(store.usage().bytes <= 10);
}

#[test]
fn every_way_out_of_the_store_is_told() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 10).unwrap();
    let told = Arc::new(Mutex::new(Vec::<Digest>::new()));
    let sink = told.clone();
    store.on_removed(move |d| sink.lock().unwrap().push(d.clone()));
    let take = || std::mem::take(&mut *told.lock().unwrap());
    // Evicted past the quota.
    let a = put(&store, b"aaaa");
    let b = put(&store, b"bbbb");
    assert!(take().is_empty());
    let c = put(&store, b"cccc");
    assert_eq!(take(), vec![a.clone()]);
    // Removed (an operator's evict, a corrupt blob).
    assert!(store.remove(&b).unwrap());
    assert_eq!(take(), vec![b.clone()]);
    assert!(!store.remove(&b).unwrap());
    assert!(take().is_empty(), "nothing left to withdraw");
    // Quarantined.
    let held = store.open_blob(&c).unwrap().unwrap();
    assert!(store.quarantine(&c, &held.file).unwrap().is_some());
    assert_eq!(take(), vec![c.clone()]);
    // Gone behind our back.
    let d = put(&store, b"dd");
    std::fs::remove_file(dir.path().join("blobs/sha256").join(d.hex())).unwrap();
    assert!(store.open_blob(&d).unwrap().is_none());
    assert_eq!(take(), vec![d]);
}

#[test]
fn one_process_per_store() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    assert!(matches!(
        Store::open(dir.path(), 100),
        Err(StoreError::Locked { .. })
    ));
    drop(store);
    assert!(Store::open(dir.path(), 100).is_ok());
}

#[test]
fn a_blob_removed_behind_our_back_is_forgotten() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    let d = put(&store, b"zz");
    std::fs::remove_file(dir.path().join("blobs/sha256").join(d.hex())).unwrap();
    assert!(store.open_blob(&d).unwrap().is_none());
    assert!(!store.contains(&d));
    assert_eq!(store.usage().bytes, 0);
}

#[test]
fn small_blobs_keep_their_media_type() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    let body = br#"{"schemaVersion":2}"#;
    let d = digest_of(body);
    store
        .put_small(&d, body, Some("application/vnd.oci.image.manifest.v1+json"))
        .unwrap();
    assert_eq!(
        store.media_type(&d).as_deref(),
        Some("application/vnd.oci.image.manifest.v1+json")
    );
    let bad = digest_of(b"x");
    assert!(store.put_small(&bad, body, None).is_err());
    assert!(!store.contains(&bad));
}

#[test]
fn pins_hold_against_gc_quota_and_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    let a = put(&store, b"aaaa");
    let b = put(&store, b"bbbb");
    let c = put(&store, b"cccc");
    store.pin("img", std::slice::from_ref(&a)).unwrap();
    let dry = store.gc(4, true).unwrap();
    assert_eq!(dry.evicted.len(), 2);
    assert_eq!(store.usage().bytes, 12, "a dry run changes nothing");
    let r = store.gc(4, false).unwrap();
    assert_eq!((r.before, r.after), (12, 4));
    assert_eq!(r.kept_pinned_blobs, 1);
    assert!(store.contains(&a) && !store.contains(&b) && !store.contains(&c));
    let r = store.gc(0, false).unwrap();
    assert!(r.evicted.is_empty() && r.after == 4, "a pinned blob stays");
    drop(store);

    // A quota smaller than the pinned content evicts nothing pinned.
    let (store, _) = Store::open(dir.path(), 2).unwrap();
    assert!(store.is_pinned(&a));
    assert!(store.contains(&a));
    assert_eq!(store.pins().len(), 1);
    // Two pins sharing a blob: unpinning one keeps it.
    store.pin("other", std::slice::from_ref(&a)).unwrap();
    assert!(store.unpin("img").unwrap().is_some());
    assert!(store.is_pinned(&a));
    assert!(store.unpin("img").unwrap().is_none());
    store.unpin("other").unwrap();
    assert!(!store.is_pinned(&a));
    assert!(!store.contains(&a), "over quota once unpinned");
}

#[test]
fn verify_reports_and_repairs_corrupt_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    let a = put(&store, b"good");
    let b = put(&store, b"fine");
    std::fs::write(dir.path().join("blobs/sha256").join(b.hex()), b"evil").unwrap();
    let mut seen = Vec::new();
    let r = store.verify(false, &mut |p| seen.push(*p)).unwrap();
    assert_eq!(r.checked, 2);
    assert_eq!(r.corrupt.len(), 1);
    assert_eq!(r.corrupt[0].digest, b);
    assert_eq!(r.corrupt[0].actual, digest_of(b"evil").to_string());
    assert!(r.removed.is_empty() && store.contains(&b));
    let last = seen.last().unwrap();
    assert_eq!((last.blobs_done, last.bytes_done), (2, 8));
    let r = store.verify(true, &mut |_| {}).unwrap();
    assert_eq!(r.removed, vec![b.clone()]);
    assert!(!store.contains(&b) && store.contains(&a));
    assert!(!dir.path().join("blobs/sha256").join(b.hex()).exists());
}

#[test]
fn a_read_only_view_never_writes() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::open_read_only(dir.path(), 100),
        Err(StoreError::Missing { .. })
    ));
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    let a = put(&store, b"aaaa");
    store
        .set_provenance(&a, &Provenance::origin("reg.example.com", "team/x"))
        .unwrap();
    let stray = dir.path().join("blobs/sha256/stray");
    std::fs::write(&stray, b"x").unwrap();
    // The daemon still holds the lock: a view opens anyway.
    let view = Store::open_read_only(dir.path(), 100).unwrap();
    assert!(view.is_read_only());
    assert!(stray.exists(), "a view removes nothing");
    let blobs = view.blobs();
    assert_eq!(blobs.len(), 1);
    assert_eq!(blobs[0].digest, a);
    assert!(blobs[0].accessed > std::time::UNIX_EPOCH);
    assert_eq!(
        view.provenance(&a).unwrap().registry.as_deref(),
        Some("reg.example.com")
    );
    assert!(matches!(
        view.pin("x", &[]),
        Err(StoreError::ReadOnly { .. })
    ));
    assert!(matches!(view.remove(&a), Err(StoreError::ReadOnly { .. })));
    assert!(matches!(
        view.gc(0, false),
        Err(StoreError::ReadOnly { .. })
    ));
    assert_eq!(view.gc(0, true).unwrap().evicted.len(), 1);
    assert!(view.verify(true, &mut |_| {}).is_err());
    assert_eq!(view.verify(false, &mut |_| {}).unwrap().corrupt.len(), 0);
    assert!(store.contains(&a));
}

fn xxh3_sums(data: &[u8]) -> Vec<u64> {
    data.chunks(SUM_CHUNK as usize)
        .map(xxhash_rust::xxh3::xxh3_64)
        .collect()
}

fn flip(path: &Path, at: u64) {
    use std::os::unix::fs::FileExt as _;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, at).unwrap();
}

#[test]
fn sums_are_read_in_slices_and_checked_for_length() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 1 << 30).unwrap();
    let data: Vec<u8> = (0..3 * SUM_CHUNK as usize + 5).map(|i| i as u8).collect();
    let d = put(&store, &data);
    let size = data.len() as u64;
    assert!(!store.has_sums(&d, size));
    assert_eq!(store.sums(&d, size), None);
    let sums = xxh3_sums(&data);
    store.set_sums(&d, &sums).unwrap();
    assert!(store.has_sums(&d, size));
    assert_eq!(store.sums(&d, size), Some(sums.clone()));
    assert_eq!(store.sums_slice(&d, size, 1, 3), Some(sums[1..3].to_vec()));
    assert_eq!(store.sums_slice(&d, size, 2, 99), Some(sums[2..].to_vec()));
    assert_eq!(store.sums_slice(&d, size, 5, 9), None);
    // Sums of another length are not this blob's.
    assert!(!store.has_sums(&d, size + SUM_CHUNK));
    assert_eq!(store.sums_slice(&d, size + SUM_CHUNK, 0, 1), None);
}

#[test]
fn a_check_records_missing_sums_and_quarantines_rot() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 1 << 30).unwrap();
    let data: Vec<u8> = (0..2 * SUM_CHUNK as usize + 9)
        .map(|i| (i * 7) as u8)
        .collect();
    let d = put(&store, &data);
    let size = data.len() as u64;

    let checked = store.check_blob(&d).unwrap().unwrap().run(&store).unwrap();
    assert_eq!(
        checked,
        Checked::Good {
            size,
            sums_fixed: true
        }
    );
    assert_eq!(store.sums(&d, size), Some(xxh3_sums(&data)));
    let again = store.check_blob(&d).unwrap().unwrap().run(&store).unwrap();
    assert_eq!(
        again,
        Checked::Good {
            size,
            sums_fixed: false
        }
    );
    // A wrong sums file with good bytes is rewritten.
    store.set_sums(&d, &[1, 2, 3]).unwrap();
    let fixed = store.check_blob(&d).unwrap().unwrap().run(&store).unwrap();
    assert_eq!(
        fixed,
        Checked::Good {
            size,
            sums_fixed: true
        }
    );

    flip(&store.blob_path(&d), SUM_CHUNK + 3);
    let mut check = store.check_blob(&d).unwrap().unwrap();
    assert_eq!(check.remaining(), size);
    let mut read = 0;
    loop {
        let n = check.step().unwrap();
        if n == 0 {
            break;
        }
        assert!(n <= SUM_CHUNK);
        read += n;
    }
    assert_eq!(read, size);
    match check.finish(&store).unwrap() {
        Checked::Corrupt {
            first_bad,
            quarantined: Some(to),
            size: s,
            ..
        } => {
            assert_eq!(first_bad, Some(SUM_CHUNK));
            assert_eq!(s, size);
            assert!(to.starts_with(dir.path().join("quarantine")));
            assert_eq!(std::fs::read(&to).unwrap().len(), data.len());
        }
        other => panic!("{other:?}"),
    }
    assert!(!store.contains(&d));
    assert!(!store.blob_path(&d).exists());
    assert!(store.sums(&d, size).is_none(), "side files go with it");
    assert_eq!(store.usage().bytes, 0);
    assert!(store.check_blob(&d).unwrap().is_none());
    assert_eq!(store.quarantined().len(), 1);
}

#[test]
fn quarantine_moves_only_the_file_that_was_read() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 1 << 30).unwrap();
    let d = put(&store, b"hello world");
    let old = store.open_blob(&d).unwrap().unwrap();
    assert!(store.quarantine(&d, &old.file).unwrap().is_some());
    assert!(!store.contains(&d));
    // Quarantined again by a second reader of the same old file: nothing.
    assert!(store.quarantine(&d, &old.file).unwrap().is_none());
    // Fetched again, then a reader of the old file finds it bad: the new
    // copy stays.
    let d2 = put(&store, b"hello world");
    assert_eq!(d, d2);
    assert!(store.quarantine(&d, &old.file).unwrap().is_none());
    assert!(store.contains(&d));
    assert_eq!(std::fs::read(store.blob_path(&d)).unwrap(), b"hello world");
    drop(old);

    // Only the newest few are kept (the first one is made the oldest).
    for (path, _) in store.quarantined() {
        std::fs::rename(&path, path.with_extension("1")).unwrap();
    }
    for i in 0..QUARANTINE_KEEP + 3 {
        let body = format!("blob {i}");
        let d = put(&store, body.as_bytes());
        let f = std::fs::File::open(store.blob_path(&d)).unwrap();
        // Distinct names: the stamp is in seconds.
        let to = store.quarantine(&d, &f).unwrap().unwrap();
        std::fs::rename(&to, to.with_extension(format!("{}", 1000 + i))).unwrap();
    }
    store.prune_quarantine();
    let kept = store.quarantined();
    assert_eq!(kept.len(), QUARANTINE_KEEP);
    assert!(kept[0]
        .0
        .to_string_lossy()
        .ends_with(&format!("{}", 1000 + QUARANTINE_KEEP + 2)));
}

#[test]
fn recovery_removes_empty_partials_and_lists_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    let empty = digest_of(b"empty");
    let some = digest_of(b"some");
    std::fs::write(store.partial_path(&empty), b"").unwrap();
    std::fs::write(store.partial_path(&some), b"so").unwrap();
    let listed = store.partials_aged();
    assert_eq!(listed.len(), 2);
    drop(store);
    let (store, rec) = Store::open(dir.path(), 100).unwrap();
    assert_eq!((rec.partials, rec.removed), (1, 1));
    let listed = store.partials_aged();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].digest.clone(), listed[0].bytes),
        (some.clone(), 2)
    );
    assert!(store.remove_partial(&some).unwrap());
    assert!(!store.remove_partial(&some).unwrap());
}

#[test]
fn a_pieces_journal_lives_and_dies_with_its_partial() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    let kept = digest_of(b"kept");
    let orphan = digest_of(b"orphan");
    let empty = digest_of(b"empty");
    std::fs::write(store.partial_path(&kept), b"so").unwrap();
    std::fs::write(store.pieces_path(&kept), b"j").unwrap();
    std::fs::write(store.pieces_path(&orphan), b"j").unwrap();
    std::fs::write(store.partial_path(&empty), b"").unwrap();
    std::fs::write(store.pieces_path(&empty), b"j").unwrap();
    drop(store);
    let (store, rec) = Store::open(dir.path(), 100).unwrap();
    // Journals are not partials of their own.
    assert_eq!((rec.partials, rec.removed), (1, 3));
    assert!(store.pieces_path(&kept).exists());
    assert!(!store.pieces_path(&orphan).exists());
    assert!(!store.pieces_path(&empty).exists());
    assert!(store.remove_partial(&kept).unwrap());
    assert!(!store.pieces_path(&kept).exists());
}

#[test]
fn scrub_state_round_trips() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), 100).unwrap();
    assert_eq!(store.scrub_state(), ScrubState::default());
    let s = ScrubState {
        started: 42,
        after: Some(digest_of(b"x").to_string()),
    };
    store.set_scrub_state(&s).unwrap();
    assert_eq!(store.scrub_state(), s);
    std::fs::write(dir.path().join("scrub.json"), b"{not json").unwrap();
    assert_eq!(store.scrub_state(), ScrubState::default());
}
