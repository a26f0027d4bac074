//! Topic patterns compiled into a trie, matched exactly as RabbitMQ does.
//!
//! A routing key is split on `.` into words: the empty key has zero words, and
//! empty segments are words (`a..b` is `a`, `""`, `b`). In a pattern, `*`
//! matches exactly one word (which may be empty) and `#` matches zero or more
//! words, anywhere and any number of times. Any other word matches itself.
//!
//! Patterns share prefixes in the trie, so matching a key costs time in the
//! key's length and the number of wildcard branches it meets, not in the number
//! of bindings. Each `(#-node, position)` pair is visited at most once per
//! match, which keeps patterns with several `#`s polynomial.
//!
//! Child maps use FxHash rather than SipHash: words come from users, but the
//! trie lives inside one process and is fed by that process's own code, so a
//! HashDoS attacker would already be running code here; the speed matters on
//! every publish (the root of a trie with 10,000 bindings is a 10,000-entry
//! map). Matching allocates nothing for keys of up to 16 words and patterns
//! without `#`.

use std::hash::Hash;

use rustc_hash::{FxHashMap, FxHashSet};
use smallvec::SmallVec;

/// Splits a key or pattern into words; `""` has none.
pub(crate) fn words(key: &str) -> impl Iterator<Item = &str> {
    let mut split = if key.is_empty() {
        None
    } else {
        Some(key.split('.'))
    };
    std::iter::from_fn(move || split.as_mut()?.next())
}

/// Does `pattern` match `key`? (A one-off check, for tests.)
#[cfg(test)]
fn matches(pattern: &str, key: &str) -> bool {
    let mut trie = TopicTrie::new();
    trie.insert(pattern, ());
    !trie.matches(key).is_empty()
}

#[derive(Debug)]
struct Node<T> {
    words: FxHashMap<Box<str>, Node<T>>,
    star: Option<Box<Node<T>>>,
    hash: Option<Box<Node<T>>>,
    /// Values bound with a pattern ending at this node.
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            words: FxHashMap::default(),
            star: None,
            hash: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.words.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }
}

/// A set of `(pattern, value)` bindings, matched against routing keys.
#[derive(Debug)]
pub(crate) struct TopicTrie<T> {
    root: Node<T>,
    len: usize,
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

impl<T: Eq + Hash> TopicTrie<T> {
    /// An empty trie.
    pub(crate) fn new() -> Self {
        TopicTrie::default()
    }

    /// Number of `(pattern, value)` bindings.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.len
    }

    /// True when there are no bindings.
    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Adds a binding; returns false if it was already there.
    pub(crate) fn insert(&mut self, pattern: &str, value: T) -> bool {
        let mut node = &mut self.root;
        let mut previous_hash = false;
        for word in words(pattern) {
            // `#.#` matches exactly what `#` matches: fold runs of `#`.
            if word == "#" && previous_hash {
                continue;
            }
            previous_hash = word == "#";
            node = match word {
                "*" => node.star.get_or_insert_with(Box::default),
                "#" => node.hash.get_or_insert_with(Box::default),
                w => node.words.entry(Box::from(w)).or_default(),
            };
        }
        if node.values.contains(&value) {
            return false;
        }
        node.values.push(value);
        self.len += 1;
        true
    }

    /// Removes a binding; returns false if it was not there. Empty branches are pruned.
    pub(crate) fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let mut path: Vec<&str> = Vec::new();
        for word in words(pattern) {
            if word == "#" && path.last() == Some(&"#") {
                continue;
            }
            path.push(word);
        }
        let removed = remove_at(&mut self.root, &path, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Every value whose pattern matches `key`, each once.
    #[cfg(test)]
    fn matches(&self, key: &str) -> Vec<&T> {
        let mut out = Vec::new();
        self.for_each_match(key, |v| out.push(v));
        // A value bound under several matching patterns is one destination.
        if out.len() > 1 {
            let mut seen = FxHashSet::default();
            seen.reserve(out.len());
            out.retain(|v| seen.insert(*v));
        }
        out
    }

    /// Calls `f` on every bound value, to update it in place.
    pub(crate) fn for_each_value_mut(&mut self, mut f: impl FnMut(&mut T)) {
        fn visit<T>(node: &mut Node<T>, f: &mut impl FnMut(&mut T)) {
            node.values.iter_mut().for_each(&mut *f);
            for child in node.words.values_mut() {
                visit(child, f);
            }
            for child in [node.star.as_deref_mut(), node.hash.as_deref_mut()]
                .into_iter()
                .flatten()
            {
                visit(child, f);
            }
        }
        visit(&mut self.root, &mut f);
    }

    /// Calls `each` with every value whose pattern matches `key`; a value
    /// bound under several matching patterns comes once per pattern.
    pub(crate) fn for_each_match<'t>(&'t self, key: &str, mut each: impl FnMut(&'t T)) {
        let key_words: SmallVec<[&str; 16]> = words(key).collect();
        // Allocates only if the trie has a `#` on the way.
        let mut seen_hash = FxHashSet::default();
        collect(&self.root, &key_words, 0, &mut each, &mut seen_hash);
    }
}

fn remove_at<T: Eq>(node: &mut Node<T>, path: &[&str], value: &T) -> bool {
    let Some((first, rest)) = path.split_first() else {
        let before = node.values.len();
        node.values.retain(|v| v != value);
        return node.values.len() != before;
    };
    let removed;
    match *first {
        "*" | "#" => {
            let slot = if *first == "*" {
                &mut node.star
            } else {
                &mut node.hash
            };
            let Some(child) = slot.as_mut() else {
                return false;
            };
            removed = remove_at(child, rest, value);
            if child.is_empty() {
                *slot = None;
            }
        }
        w => {
            let Some(child) = node.words.get_mut(w) else {
                return false;
            };
            removed = remove_at(child, rest, value);
            if child.is_empty() {
                node.words.remove(w);
            }
        }
    }
    removed
}

fn collect<'t, T>(
    node: &'t Node<T>,
    key: &[&str],
    i: usize,
    out: &mut impl FnMut(&'t T),
    seen_hash: &mut FxHashSet<(*const Node<T>, usize)>,
) {
    if i == key.len() {
        node.values.iter().for_each(&mut *out);
    }
    if let Some(hash) = node.hash.as_deref() {
        // `#` swallows zero or more words: try every split point once.
        for j in i..=key.len() {
            if seen_hash.insert((hash as *const Node<T>, j)) {
                collect(hash, key, j, out, seen_hash);
            }
        }
    }
    if i < key.len() {
        if let Some(child) = node.words.get(key[i]) {
            collect(child, key, i + 1, out, seen_hash);
        }
        if let Some(star) = node.star.as_deref() {
            collect(star, key, i + 1, out, seen_hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked cases of the reference semantics, and more.
    const CASES: &[(&str, &[&str], &[&str])] = &[
        ("#", &["", "a", "a.b", ".", "a..b", "a.b."], &[]),
        ("#.#", &["", "a", "a.b", "..", "x.y.z"], &[]),
        ("", &[""], &["a", ".", "*"]),
        ("*", &["a", "*", "#"], &["", "a.b", "."]),
        ("*.#", &["a", ".a", "a.b.", "a.b.c"], &[""]),
        ("#.*.#", &["a", ".a", "a.b.", "."], &[""]),
        (
            "a.#",
            &["a", "a.b", "a.b.", "a..b", "a."],
            &[".a", "b", "ab", ""],
        ),
        (
            "a.#.b",
            &["a.b", "a.x.y.b", "a..b", "a.b.b"],
            &["a.b.c", "a", "b", "a.bb"],
        ),
        ("a.*", &["a.b", "a."], &["a", "a..b", "a.b.c"]),
        ("*.*", &["a.b", ".", "a."], &["a", "a.b.c", ""]),
        ("#.a", &["a", "x.a", "x.y.a", ".a"], &["a.x", ""]),
        ("a.*.#", &["a.b", "a.b.c", "a."], &["a", "b.a"]),
        (
            "#.b.#",
            &["b", "a.b", "b.c", "a.b.c", "a.x.b.y.z"],
            &["", "a", "bb"],
        ),
        ("a.#.#.b", &["a.b", "a.x.b"], &["a"]),
        (
            "stock.usd.nyse",
            &["stock.usd.nyse"],
            &["stock.usd", "stock.usd.nyse.x", "stock.eur.nyse"],
        ),
        (
            "*.orange.*",
            &["quick.orange.rabbit", "lazy.orange.elephant"],
            &["quick.orange.fox.x", "orange", "lazy.brown.fox"],
        ),
        (
            "*.*.rabbit",
            &["quick.orange.rabbit", "lazy.pink.rabbit"],
            &["quick.brown.fox", "lazy.orange.male.rabbit"],
        ),
        (
            "lazy.#",
            &[
                "lazy",
                "lazy.brown.fox",
                "lazy.pink.rabbit",
                "lazy.orange.male.rabbit",
            ],
            &["quick.lazy"],
        ),
        ("a*.b", &["a*.b"], &["ab.b", "a.b"]),
        ("a.#*", &["a.#*"], &["a.b"]),
        ("..", &[".."], &[".", "...", "a.."]),
    ];

    #[test]
    fn reference_table() {
        for (pattern, yes, no) in CASES {
            for key in *yes {
                assert!(matches(pattern, key), "{pattern:?} should match {key:?}");
            }
            for key in *no {
                assert!(
                    !matches(pattern, key),
                    "{pattern:?} should not match {key:?}"
                );
            }
        }
    }

    #[test]
    fn all_patterns_in_one_trie_agree_with_one_by_one() {
        let mut trie = TopicTrie::new();
        for (i, (pattern, _, _)) in CASES.iter().enumerate() {
            trie.insert(pattern, i);
        }
        let keys: Vec<&str> = CASES
            .iter()
            .flat_map(|(_, y, n)| y.iter().chain(n.iter()).copied())
            .collect();
        for key in keys {
            let mut got: Vec<usize> = trie.matches(key).into_iter().copied().collect();
            got.sort();
            let want: Vec<usize> = CASES
                .iter()
                .enumerate()
                .filter(|(_, (p, _, _))| matches(p, key))
                .map(|(i, _)| i)
                .collect();
            assert_eq!(got, want, "key {key:?}");
        }
    }

    #[test]
    fn one_value_per_match_however_many_patterns_hit() {
        let mut trie = TopicTrie::new();
        trie.insert("a.#", "q");
        trie.insert("#.b", "q");
        trie.insert("a.b", "q");
        trie.insert("*.*", "q");
        assert_eq!(trie.matches("a.b"), vec![&"q"]);
        assert_eq!(trie.len(), 4);
    }

    #[test]
    fn insert_and_remove_prune_the_trie() {
        let mut trie = TopicTrie::new();
        assert!(trie.insert("a.*.c", 1));
        assert!(!trie.insert("a.*.c", 1), "duplicate binding");
        assert!(trie.insert("a.#", 2));
        assert!(trie.insert("a.#.#", 3), "folds to a.# but is another value");
        assert_eq!(trie.len(), 3);
        assert!(trie.remove("a.#.#", &3));
        assert!(!trie.remove("a.#", &3));
        assert!(trie.remove("a.*.c", &1));
        assert!(trie.remove("a.#", &2));
        assert!(trie.is_empty());
        assert!(trie.root.is_empty(), "every branch pruned");
    }

    #[test]
    fn many_hashes_stay_fast() {
        let mut trie = TopicTrie::new();
        trie.insert("#.a.#.a.#.a.#.a.#.b", ());
        let key = vec!["a"; 120].join(".");
        assert!(trie.matches(&key).is_empty());
        assert_eq!(trie.matches(&(key + ".b")).len(), 1);
    }

    /// A brute-force matcher straight from the definition, for property tests.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|i| reference(rest, &key[i..])),
            Some((&"*", rest)) => !key.is_empty() && reference(rest, &key[1..]),
            Some((w, rest)) => key.first() == Some(w) && reference(rest, &key[1..]),
        }
    }

    proptest::proptest! {
        #[test]
        fn trie_agrees_with_the_definition(
            patterns in proptest::collection::vec(proptest::collection::vec(proptest::sample::select(vec!["a", "b", "", "*", "#"]), 0..6), 1..8),
            key in proptest::collection::vec(proptest::sample::select(vec!["a", "b", ""]), 0..7),
        ) {
            let key_str = key.join(".");
            // "" joined from [""] is the empty key, which has zero words.
            let key_words: Vec<&str> = words(&key_str).collect();
            let mut trie = TopicTrie::new();
            let pattern_strs: Vec<String> = patterns.iter().map(|p| p.join(".")).collect();
            for (i, p) in pattern_strs.iter().enumerate() {
                trie.insert(p, i);
            }
            let mut got: Vec<usize> = trie.matches(&key_str).into_iter().copied().collect();
            got.sort();
            let want: Vec<usize> = pattern_strs
                .iter()
                .enumerate()
                .filter(|(_, p)| reference(&words(p).collect::<Vec<_>>(), &key_words))
                .map(|(i, _)| i)
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }
}
