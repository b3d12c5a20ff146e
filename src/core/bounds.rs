//! Bounds on what one authenticated client can make the core hold: consumer ids per
//! certificate identity, consumers remembered after they left (by count and by bytes), the
//! registration's labels and endpoint, and the names of one subscription's filter. Each has a
//! flag, a refusal that names it (RESOURCE_EXHAUSTED, with the flag to raise), and a label of
//! `workerpush_limit_refusals_total`.
//!
//! Pure data and checks: no I/O, no transport.

use std::collections::BTreeMap;

use super::{error::RequestError, types::WorkerFilter};

/// The bounds in force; see the module docs. The defaults are the flags' defaults.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Distinct consumer ids (`identity` and `identity/suffix`) one identity may have, in the
    /// registry and among the subscriptions the core tracks (`MAX_CONSUMER_IDS_PER_IDENTITY`).
    pub consumer_ids_per_identity: usize,
    /// Consumers remembered after they left (`MAX_DEPARTED_CONSUMERS`); past it the oldest
    /// departure is forgotten first.
    pub departed_consumers: usize,
    /// Bytes those departed consumers may hold, each distinct filter counted once
    /// (`MAX_DEPARTED_BYTES`); past it the oldest departure is forgotten first.
    pub departed_bytes: usize,
    /// Worker names one subscription may list (`MAX_FILTER_NAMES`).
    pub filter_names: usize,
    /// Labels one registration may carry (`MAX_LABELS`).
    pub labels: usize,
    /// Bytes of one label key, and of one label value (`MAX_LABEL_BYTES`).
    pub label_bytes: usize,
    /// Bytes of one registration as a whole: endpoint, keys and values
    /// (`MAX_REGISTRATION_BYTES`).
    pub registration_bytes: usize,
    /// Bytes of a registration's endpoint (`MAX_ENDPOINT_BYTES`).
    pub endpoint_bytes: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Self {
            consumer_ids_per_identity: 1024,
            departed_consumers: 10_000,
            departed_bytes: 16 << 20,
            filter_names: super::types::MAX_FILTER_NAMES,
            labels: 64,
            label_bytes: 1024,
            registration_bytes: 16 << 10,
            endpoint_bytes: 1024,
        }
    }
}

/// One bound, as metrics and refusals name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bound {
    /// [`Bounds::consumer_ids_per_identity`].
    ConsumerIds,
    /// [`Bounds::departed_consumers`] (counted when a departure is forgotten early).
    DepartedConsumers,
    /// [`Bounds::departed_bytes`] (counted when a departure is forgotten early).
    DepartedBytes,
    /// [`Bounds::filter_names`].
    FilterNames,
    /// [`Bounds::labels`].
    Labels,
    /// [`Bounds::label_bytes`].
    LabelBytes,
    /// [`Bounds::registration_bytes`].
    RegistrationBytes,
    /// [`Bounds::endpoint_bytes`].
    EndpointBytes,
}

impl Bound {
    /// Every bound.
    pub const ALL: [Bound; 8] = [
        Bound::ConsumerIds,
        Bound::DepartedConsumers,
        Bound::DepartedBytes,
        Bound::FilterNames,
        Bound::Labels,
        Bound::LabelBytes,
        Bound::RegistrationBytes,
        Bound::EndpointBytes,
    ];

    /// The `limit` label of `workerpush_limit_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            Bound::ConsumerIds => "consumer_ids_per_identity",
            Bound::DepartedConsumers => "departed_consumers",
            Bound::DepartedBytes => "departed_bytes",
            Bound::FilterNames => "filter_names",
            Bound::Labels => "labels",
            Bound::LabelBytes => "label_bytes",
            Bound::RegistrationBytes => "registration_bytes",
            Bound::EndpointBytes => "endpoint_bytes",
        }
    }

    /// The flag that sets it.
    pub fn flag(self) -> &'static str {
        match self {
            Bound::ConsumerIds => "--max-consumer-ids-per-identity",
            Bound::DepartedConsumers => "--max-departed-consumers",
            Bound::DepartedBytes => "--max-departed-bytes",
            Bound::FilterNames => "--max-filter-names",
            Bound::Labels => "--max-labels",
            Bound::LabelBytes => "--max-label-bytes",
            Bound::RegistrationBytes => "--max-registration-bytes",
            Bound::EndpointBytes => "--max-endpoint-bytes",
        }
    }

    /// Counts one refusal (or early forgetting) under this bound.
    pub fn count(self) {
        metrics::counter!("workerpush_limit_refusals_total", "limit" => self.label()).increment(1);
    }

    /// Counts a refusal and says why: `what` and the flag that raises the limit.
    pub fn refuse(self, what: impl std::fmt::Display) -> RequestError {
        self.count();
        RequestError::ResourceExhausted(format!("{what} ({} limit, {})", self.label(), self.flag()))
    }

    /// Makes every bound's counter exist at 0, so that a dashboard sees it before the first
    /// refusal.
    pub fn register_counters() {
        for bound in Self::ALL {
            metrics::counter!("workerpush_limit_refusals_total", "limit" => bound.label())
                .increment(0);
        }
    }
}

impl Bounds {
    /// Checks a registration's endpoint and labels.
    pub fn check_registration(
        &self,
        endpoint: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RequestError> {
        if endpoint.len() > self.endpoint_bytes {
            return Err(Bound::EndpointBytes.refuse(format_args!(
                "endpoint is {} bytes, more than {}",
                endpoint.len(),
                self.endpoint_bytes
            )));
        }
        if labels.len() > self.labels {
            return Err(Bound::Labels.refuse(format_args!(
                "{} labels, more than {}",
                labels.len(),
                self.labels
            )));
        }
        let mut total = endpoint.len();
        for (key, value) in labels {
            let longest = key.len().max(value.len());
            if longest > self.label_bytes {
                return Err(Bound::LabelBytes.refuse(format_args!(
                    "label {:?} has a key or value of {longest} bytes, more than {}",
                    key.chars().take(64).collect::<String>(),
                    self.label_bytes
                )));
            }
            total += key.len() + value.len();
        }
        if total > self.registration_bytes {
            return Err(Bound::RegistrationBytes.refuse(format_args!(
                "endpoint and labels are {total} bytes, more than {}",
                self.registration_bytes
            )));
        }
        Ok(())
    }

    /// Checks the size of a subscription's filter.
    pub fn check_filter(&self, filter: &WorkerFilter) -> Result<(), RequestError> {
        let names = filter.names().map_or(0, <[_]>::len);
        if names > self.filter_names {
            return Err(Bound::FilterNames.refuse(format_args!(
                "{names} worker names in one subscription, more than {}",
                self.filter_names
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::{ErrorCode, error::Coded};

    #[test]
    fn registrations_past_each_bound_are_refused_naming_it() {
        let bounds = Bounds {
            labels: 2,
            label_bytes: 4,
            registration_bytes: 12,
            endpoint_bytes: 8,
            ..Bounds::default()
        };
        let labels = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(
            bounds
                .check_registration("host:1", &labels(&[("a", "b")]))
                .is_ok()
        );
        let cases = [
            ("123456789", labels(&[]), "--max-endpoint-bytes"),
            (
                "",
                labels(&[("a", ""), ("b", ""), ("c", "")]),
                "--max-labels",
            ),
            ("", labels(&[("a", "12345")]), "--max-label-bytes"),
            (
                "1234567",
                labels(&[("ab", "cdef")]),
                "--max-registration-bytes",
            ),
        ];
        for (endpoint, labels, flag) in cases {
            let error = bounds.check_registration(endpoint, &labels).unwrap_err();
            assert_eq!(error.code(), ErrorCode::ResourceExhausted);
            assert!(error.to_string().contains(flag), "{error}");
        }
    }
}
