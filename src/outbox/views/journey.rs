//! A reading's journey for `hearth readings show`: its row, and each MQTT
//! exchange (`journeys`, schema 5) it went out in.

/// Reading ids as ranges, `7-12,15`: short in the journey row however
/// large the batch. `ids` in any order; the ranges are sorted.
pub fn id_ranges(ids: &[i64]) -> String {
    let mut ids = ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    let mut out = String::new();
    let mut i = 0;
    while i < ids.len() {
        let start = ids[i];
        let mut end = start;
        while i + 1 < ids.len() && ids[i + 1] == end + 1 {
            i += 1;
            end = ids[i];
        }
        if !out.is_empty() {
            out.push(',');
        }
        if end == start {
            out.push_str(&start.to_string());
        } else {
            out.push_str(&format!("{start}-{end}"));
        }
        i += 1;
    }
    out
}

/// The ids of [`id_ranges`] text, in order; `None` if it is not such text.
pub fn parse_id_ranges(text: &str) -> Option<Vec<i64>> {
    let mut ids = Vec::new();
    for part in text.split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (i64, i64) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 1_000_000 {
                    return None;
                }
                ids.extend(a..=b);
            }
            None => ids.push(part.parse().ok()?),
        }
    }
    Some(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_ranges_round_trip() {
        assert_eq!(id_ranges(&[15, 7, 8, 9, 10, 11, 12]), "7-12,15");
        assert_eq!(id_ranges(&[]), "");
        assert_eq!(id_ranges(&[3]), "3");
        assert_eq!(
            parse_id_ranges("7-12,15").unwrap(),
            vec![7, 8, 9, 10, 11, 12, 15]
        );
        assert_eq!(parse_id_ranges("x"), None);
    }
}
