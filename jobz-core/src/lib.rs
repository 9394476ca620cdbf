//! jobz-core
