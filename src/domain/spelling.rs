//! "Did you mean …?": the known name closest to a misspelled one, for error messages.

/// The candidate closest to `word`, compared without regard to ASCII case, if one is close: edit
/// distance at most a quarter of `word`'s length (at least 1: `Files.Read.All` is not a typo of
/// `User.Read.All`). Ties go to the earlier candidate.
/// No suggestion when `word` itself is a candidate.
pub fn nearest<'a, I>(word: &str, candidates: I) -> Option<&'a str>
where
    I: IntoIterator<Item = &'a str>,
{
    let lower = word.to_ascii_lowercase();
    let limit = (word.chars().count() / 4).max(1);
    let mut best: Option<(usize, &'a str)> = None;
    for c in candidates {
        if c == word {
            return None;
        }
        let d = edit_distance(&lower, &c.to_ascii_lowercase());
        if d <= limit && best.is_none_or(|(b, _)| d < b) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Levenshtein distance over characters.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = if ca == *cb {
                prev
            } else {
                1 + prev.min(cur).min(row[j])
            };
            prev = cur;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_names_are_suggested_and_far_ones_are_not() {
        let known = ["Mail.Read", "Mail.Send", "User.Read.All"];
        assert_eq!(nearest("Mail.Reed", known), Some("Mail.Read"));
        assert_eq!(nearest("mail.read", known), Some("Mail.Read"));
        assert_eq!(nearest("Mail.Sned", known), Some("Mail.Send"));
        assert_eq!(nearest("User.Read.Al", known), Some("User.Read.All"));
        assert_eq!(nearest("Files.Read.All", known), None);
        assert_eq!(
            nearest("Mail.Read", known),
            None,
            "an exact name is no typo"
        );
        assert_eq!(nearest("", known), None);
    }

    #[test]
    fn distance() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", "abc"), 0);
    }
}
