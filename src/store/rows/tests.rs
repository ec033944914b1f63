use super::col;

/// The names of the columns a query selects, in order (`l.x`, `a.x AS y`).
fn selected(sql: &str) -> Vec<String> {
    let list = sql
        .strip_prefix("SELECT ")
        .and_then(|s| s.split(" FROM ").next())
        .expect("a SELECT");
    list.split(',')
        .map(|c| {
            let c = c.trim();
            let c = c.rsplit(" AS ").next().unwrap_or(c);
            c.rsplit('.').next().unwrap_or(c).to_string()
        })
        .collect()
}

#[test]
fn column_positions_match_the_license_select() {
    let names = selected(license_select!());
    assert_eq!(names, col::NAMES, "license_select! and col:: disagree");
}

#[test]
fn extra_columns_follow_the_license_select() {
    assert_eq!(selected(super::VALIDATION_SQL), super::vcol::NAMES);
    let l = selected(super::LICENSE_WITH_ACTIVATIONS);
    assert_eq!(&l[..col::EXTRA], col::NAMES);
    assert_eq!(
        &l[col::EXTRA..],
        ["a_fingerprint", "a_hostname", "a_activated_at"]
    );
}

#[test]
fn column_positions_match_the_cache_selects() {
    assert_eq!(selected(super::LOAD_SQL), super::cache_col::NAMES);
    assert_eq!(
        selected(super::cache_select_few_pg!()),
        super::cache_col::NAMES
    );
    assert_eq!(selected(super::PRODUCTS_SQL), super::policy_col::NAMES);
}

#[test]
fn column_positions_match_the_product_and_code_selects() {
    assert_eq!(selected(product_select!()), super::product_col::NAMES);
    assert_eq!(selected(super::code_select!()), super::code_col::NAMES);
    let both = selected(super::code_and_product_select!());
    let at = super::CODE_PRODUCT_AT;
    assert_eq!(at, super::code_col::NAMES.len());
    assert_eq!(&both[..at], super::code_col::NAMES);
    assert_eq!(&both[at..], super::product_col::NAMES);
    assert_eq!(selected(super::token_select!()), super::token_col::NAMES);
    assert_eq!(
        selected(super::signing_key_select!()),
        super::key_col::NAMES
    );
}
