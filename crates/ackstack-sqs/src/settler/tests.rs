use super::*;

#[test]
fn dedup_ids_are_bounded() {
    let t = SqsToken::from_receipt_handle("h".repeat(1000));
    let id = dead_letter_dedup_id(&t);
    assert!(id.len() <= 128);
    assert_eq!(id, dead_letter_dedup_id(&t));
}

#[test]
fn ids_map_back_to_slots() {
    let mut slots = vec![Some(SqsToken::from_receipt_handle("a")), None];
    assert!(take(&mut slots, "0").is_some());
    assert!(take(&mut slots, "0").is_none());
    assert!(take(&mut slots, "1").is_none());
    assert!(take(&mut slots, "7").is_none());
    assert!(take(&mut slots, "x").is_none());
}
