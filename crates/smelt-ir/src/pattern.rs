//! Naming nodes on the command line: `--exclude`, per-layer overrides.

use crate::Node;

/// True when `pattern` is the node's op type, its name, or a glob (`*`, `?`) over its name.
pub fn matches_node(pattern: &str, n: &Node) -> bool {
    pattern == n.op_type || pattern == n.name || (is_glob(pattern) && glob(pattern, &n.name))
}

pub fn is_glob(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Glob match of the whole string: `*` any run of characters, `?` one character.
pub fn glob(p: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (p.chars().collect(), s.chars().collect());
    // Iterative matcher with backtracking to the last '*': linear in practice, no recursion.
    let (mut i, mut j, mut star, mut mark) = (0, 0, None, 0);
    while j < s.len() {
        if i < p.len() && (p[i] == '?' || p[i] == s[j]) {
            i += 1;
            j += 1;
        } else if i < p.len() && p[i] == '*' {
            star = Some(i);
            mark = j;
            i += 1;
        } else if let Some(st) = star {
            i = st + 1;
            mark += 1;
            j = mark;
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_patterns() {
        assert!(glob("layer.*.attn", "layer.3.attn"));
        assert!(glob("*", ""));
        assert!(glob("a?c", "abc"));
        assert!(!glob("a?c", "abbc"));
        assert!(glob("*/fc*", "block/3/fc2"));
        assert!(!glob("*fc", "fc2"));
    }
}
