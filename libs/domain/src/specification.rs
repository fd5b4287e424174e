//! Composable specifications: predicates over a candidate that combine with `and`, `or` and
//! `not`, and can say in words what they require. The same abstraction validates job specs
//! (see [`crate::spec`]) and decides which workers can take a job (see [`crate::worker`]).

use std::fmt;
use std::sync::Arc;

/// A business rule over candidates of type `T`.
pub trait Specification<T: ?Sized>: Send + Sync {
    /// Whether `candidate` satisfies the rule.
    fn is_satisfied_by(&self, candidate: &T) -> bool;

    /// What the rule requires, in words, for error messages and explanations.
    fn describe(&self) -> String;

    /// Both rules.
    fn and<S: Specification<T>>(self, other: S) -> And<Self, S>
    where
        Self: Sized,
    {
        And(self, other)
    }

    /// Either rule.
    fn or<S: Specification<T>>(self, other: S) -> Or<Self, S>
    where
        Self: Sized,
    {
        Or(self, other)
    }

    /// The opposite rule.
    fn not(self) -> Not<Self>
    where
        Self: Sized,
    {
        Not(self)
    }

    /// Leaf rules among this one that `candidate` fails, for telling a person what did not match.
    /// Composite rules descend; leaves answer with their own description.
    fn unmet(&self, candidate: &T) -> Vec<String> {
        if self.is_satisfied_by(candidate) {
            Vec::new()
        } else {
            vec![self.describe()]
        }
    }
}

/// Both specifications hold.
#[derive(Debug, Clone)]
pub struct And<A, B>(pub A, pub B);

/// At least one specification holds.
#[derive(Debug, Clone)]
pub struct Or<A, B>(pub A, pub B);

/// The specification does not hold.
#[derive(Debug, Clone)]
pub struct Not<A>(pub A);

impl<T: ?Sized, A: Specification<T>, B: Specification<T>> Specification<T> for And<A, B> {
    fn is_satisfied_by(&self, c: &T) -> bool {
        self.0.is_satisfied_by(c) && self.1.is_satisfied_by(c)
    }

    fn describe(&self) -> String {
        format!("({} and {})", self.0.describe(), self.1.describe())
    }

    fn unmet(&self, c: &T) -> Vec<String> {
        let mut out = self.0.unmet(c);
        out.extend(self.1.unmet(c));
        out
    }
}

impl<T: ?Sized, A: Specification<T>, B: Specification<T>> Specification<T> for Or<A, B> {
    fn is_satisfied_by(&self, c: &T) -> bool {
        self.0.is_satisfied_by(c) || self.1.is_satisfied_by(c)
    }

    fn describe(&self) -> String {
        format!("({} or {})", self.0.describe(), self.1.describe())
    }
}

impl<T: ?Sized, A: Specification<T>> Specification<T> for Not<A> {
    fn is_satisfied_by(&self, c: &T) -> bool {
        !self.0.is_satisfied_by(c)
    }

    fn describe(&self) -> String {
        format!("not {}", self.0.describe())
    }
}

/// A leaf specification from a described predicate.
#[derive(Clone)]
pub struct Predicate<T: ?Sized> {
    description: String,
    test: Arc<dyn Fn(&T) -> bool + Send + Sync>,
}

impl<T: ?Sized> Predicate<T> {
    pub fn new(
        description: impl Into<String>,
        test: impl Fn(&T) -> bool + Send + Sync + 'static,
    ) -> Self {
        Self {
            description: description.into(),
            test: Arc::new(test),
        }
    }
}

impl<T: ?Sized> fmt::Debug for Predicate<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Predicate").field(&self.description).finish()
    }
}

impl<T: ?Sized> Specification<T> for Predicate<T> {
    fn is_satisfied_by(&self, c: &T) -> bool {
        (self.test)(c)
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// Boxed specifications compose too, so rule sets can be built at run time.
impl<T: ?Sized> Specification<T> for Box<dyn Specification<T>> {
    fn is_satisfied_by(&self, c: &T) -> bool {
        (**self).is_satisfied_by(c)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }

    fn unmet(&self, c: &T) -> Vec<String> {
        (**self).unmet(c)
    }
}

/// All of a list of specifications (true for an empty list).
pub struct AllOf<T: ?Sized>(pub Vec<Box<dyn Specification<T>>>);

impl<T: ?Sized> Specification<T> for AllOf<T> {
    fn is_satisfied_by(&self, c: &T) -> bool {
        self.0.iter().all(|s| s.is_satisfied_by(c))
    }

    fn describe(&self) -> String {
        let parts: Vec<String> = self.0.iter().map(|s| s.describe()).collect();
        parts.join(" and ")
    }

    fn unmet(&self, c: &T) -> Vec<String> {
        self.0.iter().flat_map(|s| s.unmet(c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn even() -> Predicate<i64> {
        Predicate::new("is even", |n: &i64| n % 2 == 0)
    }

    fn positive() -> Predicate<i64> {
        Predicate::new("is positive", |n: &i64| *n > 0)
    }

    #[test]
    fn combinators_follow_boolean_logic() {
        for n in -4..=4i64 {
            assert_eq!(
                even().and(positive()).is_satisfied_by(&n),
                n % 2 == 0 && n > 0
            );
            assert_eq!(
                even().or(positive()).is_satisfied_by(&n),
                n % 2 == 0 || n > 0
            );
            assert_eq!(even().not().is_satisfied_by(&n), n % 2 != 0);
        }
        assert_eq!(
            even().and(positive().not()).describe(),
            "(is even and not is positive)"
        );
    }

    #[test]
    fn unmet_names_the_failing_leaves() {
        let spec = even().and(positive());
        assert_eq!(spec.unmet(&-3), vec!["is even", "is positive"]);
        assert!(spec.unmet(&2).is_empty());
        let all = AllOf(vec![Box::new(even()), Box::new(positive())]);
        assert_eq!(all.unmet(&4), Vec::<String>::new());
        assert_eq!(all.unmet(&3), vec!["is even"]);
    }
}
