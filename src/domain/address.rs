//! Mailbox addresses as mailscope accepts them before Exchange has its say.

/// A mailbox address, checked loosely (Exchange is the authority on existence).
pub fn is_address(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && s.len() <= 320
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loose_address_check() {
        assert!(is_address("a@b.com"));
        assert!(!is_address("a@b"));
        assert!(!is_address("@b.com"));
        assert!(!is_address("a@.b.com"));
    }
}
