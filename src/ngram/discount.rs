//! Discounts for Kneser-Ney smoothing, estimated from counts of counts.
//!
//! Modified Kneser-Ney (Chen and Goodman 1998, eq. 26): with t_k the number of
//! n-grams of an order whose adjusted count is k,
//! Y = t1 / (t1 + 2 t2) and D_k = k - (k+1) Y t_{k+1} / t_k for k = 1, 2, 3
//! (D3 applies to counts of 3 and more). Plain interpolated Kneser-Ney uses one
//! discount D = Y (eq. 15, after Ney, Essen and Kneser 1994).
//!
//! The arithmetic is single precision in the same order as lmplz, so the
//! discounts match its to the last bit. Where an estimate is undefined (some t_k
//! is zero) or out of range (D_k outside [0, k]), typical of tiny or artificial
//! data, lmplz stops with "bad discount" unless told `--discount_fallback`; we
//! always fall back, to lmplz's default fallback 0.5 1 1.5, and report a warning.

use super::adjust::CountsOfCounts;

/// The three discounts of modified Kneser-Ney for one order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Discount {
    /// Discount for n-grams seen once.
    pub d1: f32,
    /// Discount for n-grams seen twice.
    pub d2: f32,
    /// Discount for n-grams seen three times or more.
    pub d3_plus: f32,
}

impl Discount {
    /// lmplz's `--discount_fallback` default.
    pub const FALLBACK: Discount = Discount {
        d1: 0.5,
        d2: 1.0,
        d3_plus: 1.5,
    };

    /// The discount subtracted from an n-gram with this (adjusted) count.
    pub fn for_count(&self, count: u64) -> f32 {
        match count {
            0 => 0.0,
            1 => self.d1,
            2 => self.d2,
            _ => self.d3_plus,
        }
    }

    /// The count after discounting, `count - D(count)`, in f32 as lmplz.
    pub(crate) fn discounted(&self, count: u64) -> f32 {
        count as f32 - self.for_count(count)
    }
}

/// Modified Kneser-Ney discounts from counts of counts, or `None` where lmplz
/// would report a bad discount.
pub(crate) fn modified_kneser_ney(t: &CountsOfCounts) -> Option<Discount> {
    if t[1] == 0 || t[2] == 0 || t[3] == 0 {
        return None;
    }
    // lmplz: y = float(t1) / float(t1 + 2.0 * t2), the denominator in double.
    let y = t[1] as f32 / ((t[1] as f64 + 2.0 * t[2] as f64) as f32);
    let d = |k: usize| k as f32 - (k + 1) as f32 * y * t[k + 1] as f32 / t[k] as f32;
    let discount = Discount {
        d1: d(1),
        d2: d(2),
        d3_plus: d(3),
    };
    let in_range = |value: f32, k: f32| (0.0..=k).contains(&value);
    (in_range(discount.d1, 1.0) && in_range(discount.d2, 2.0) && in_range(discount.d3_plus, 3.0))
        .then_some(discount)
}

/// The single discount D = t1 / (t1 + 2 t2) of interpolated Kneser-Ney, or
/// `None` when it is undefined or not in (0, 1].
pub(crate) fn kneser_ney(t: &CountsOfCounts) -> Option<Discount> {
    if t[1] == 0 {
        return None;
    }
    let d = t[1] as f32 / ((t[1] as f64 + 2.0 * t[2] as f64) as f32);
    (d > 0.0 && d <= 1.0).then_some(Discount {
        d1: d,
        d2: d,
        d3_plus: d,
    })
}

/// Discounts for every order, falling back where the estimate fails; returns
/// the discounts and, when any order fell back, one warning naming them all.
pub(crate) fn estimate_discounts(
    counts_of_counts: &[CountsOfCounts],
    modified: bool,
) -> (Vec<Discount>, Option<String>) {
    let fallback = if modified {
        Discount::FALLBACK
    } else {
        let d = Discount::FALLBACK.d1;
        Discount { d1: d, d2: d, d3_plus: d }
    };
    let mut failed = Vec::new();
    let discounts = counts_of_counts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let estimate = if modified { modified_kneser_ney(t) } else { kneser_ney(t) };
            estimate.unwrap_or_else(|| {
                failed.push(format!("{}-grams t1..t4 = {} {} {} {}", i + 1, t[1], t[2], t[3], t[4]));
                fallback
            })
        })
        .collect();
    let warning = (!failed.is_empty()).then(|| {
        format!(
            "could not estimate Kneser-Ney discounts from counts of counts ({}); is this small or \
             artificial data? using fixed discounts D1={} D2={} D3+={} for those orders",
            failed.join("; "),
            fallback.d1,
            fallback.d2,
            fallback.d3_plus
        )
    });
    (discounts, warning)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modified_discounts_follow_chen_goodman_eq_26() {
        let t = [0, 100, 40, 20, 10];
        let d = modified_kneser_ney(&t).expect("valid");
        let y = 100.0 / 180.0;
        assert!((d.d1 as f64 - (1.0 - 2.0 * y * 40.0 / 100.0)).abs() < 1e-6);
        assert!((d.d2 as f64 - (2.0 - 3.0 * y * 20.0 / 40.0)).abs() < 1e-6);
        assert!((d.d3_plus as f64 - (3.0 - 4.0 * y * 10.0 / 20.0)).abs() < 1e-6);
        assert_eq!(d.for_count(7), d.d3_plus);
        assert_eq!(d.discounted(1), 1.0 - d.d1);
    }

    #[test]
    fn bad_discounts_fall_back_with_a_warning() {
        let (discounts, warning) =
            estimate_discounts(&[[0, 5, 0, 1, 0], [0, 100, 40, 20, 10], [0, 3, 0, 0, 0]], true);
        assert_eq!(discounts[0], Discount::FALLBACK);
        assert_ne!(discounts[1], Discount::FALLBACK);
        assert_eq!(discounts[2], Discount::FALLBACK);
        let warning = warning.expect("two orders fell back");
        assert!(
            warning.contains("1-grams t1..t4 = 5 0 1 0; 3-grams t1..t4 = 3 0 0 0")
                && !warning.contains("2-grams")
                && warning.contains("D1=0.5 D2=1 D3+=1.5"),
            "{warning}"
        );
        let (_, warning) = estimate_discounts(&[[0, 100, 40, 20, 10]], true);
        assert!(warning.is_none());
    }

    #[test]
    fn kneser_ney_uses_one_discount() {
        let d = kneser_ney(&[0, 10, 5, 0, 0]).expect("valid");
        assert_eq!((d.d1, d.d2, d.d3_plus), (0.5, 0.5, 0.5));
        assert!(kneser_ney(&[0, 0, 5, 1, 1]).is_none());
    }
}
