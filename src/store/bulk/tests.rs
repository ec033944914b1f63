use chrono::Utc;

use super::*;
use crate::domain::ProductCode;

#[test]
fn every_seeded_shape_leaves_a_free_seat_and_a_term_both_editions_sell() {
    for i in 0..10_000 {
        let s = SeedPlan::shape(i);
        assert!(s.activations < s.seats, "license {i}: {s:?}");
        assert!((1..=2).contains(&s.term_years));
        assert!((0..365).contains(&s.started_days_ago));
        assert_eq!(SeedPlan::class(s.class), (s.edition, s.seats));
    }
}

async fn schema_of(path: &std::path::Path) -> Vec<(String, String)> {
    let mut conn = SqliteConnection::connect_with(&SqliteConnectOptions::new().filename(path))
        .await
        .unwrap();
    sqlx::query_as("SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL ORDER BY name")
        .fetch_all(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn sqlite_seeding_restores_every_index_and_trigger_and_counts_seats_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("seed.db");
    let url = DatabaseUrl::Sqlite(path.clone());
    crate::store::sqlite::migrate(&path).await.unwrap();
    let before = schema_of(&path).await;
    let store = url.open(Default::default()).await.unwrap();
    let product = ProductCode::parse("SEED").unwrap();
    let spec = crate::domain::product::ProductSpec {
        display_name: "seed".into(),
        latest_version: SEED_VERSION.into(),
        ..Default::default()
    };
    use crate::store::Store;
    let now = crate::domain::time::truncate_micros(Utc::now());
    store
        .create_product(
            &crate::domain::Product::new(product.clone(), spec).unwrap(),
            now,
        )
        .await
        .unwrap();
    let plan = SeedPlan {
        product,
        licenses: 1234,
        codes: 100,
        now,
    };
    let seeded = seed(&url, &plan).await.unwrap();
    assert_eq!(seeded.keys.len(), 1234);
    assert_eq!(seeded.codes.len(), 100);
    assert_eq!(
        schema_of(&path).await,
        before,
        "indexes and triggers are back"
    );

    let a = audit(&url).await.unwrap();
    assert_eq!(a.licenses, 1234);
    assert_eq!(a.activations, seeded.activations);
    assert_eq!((a.seat_count_mismatches, a.over_seat_limit), (0, 0));

    // The trigger counts again: one more activation, through the store.
    let i = 7;
    let key = &seeded.keys[i];
    let actor = crate::store::Actor("test".into());
    let (license, _) = store
        .activate(key, "new-workstation", "h", SEED_VERSION, &actor, now)
        .await
        .unwrap();
    assert_eq!(license.seats_used, SeedPlan::shape(i).activations + 1);
    let view = store
        .validation_view(key, Some(&SeedPlan::fingerprint(i, 0)))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.fingerprint_bound, Some(true));
    assert_eq!(audit(&url).await.unwrap().seat_count_mismatches, 0);
    store.close().await;
}

#[test]
fn the_six_classes_are_distinct() {
    let mut seen = std::collections::HashSet::new();
    for c in 0..SeedPlan::CLASSES {
        assert!(seen.insert(SeedPlan::class(c)));
    }
}
