// parallel/tags.h: message tags of different kinds or indices never collide, stay within
// MPI's least tag bound, and an index past its kind's range is refused.
#include <gtest/gtest.h>

#include <set>

#include "parallel/tags.h"
#include "test_util.h"

namespace crash {
namespace {

const MpiTag kAllTags[] = {MpiTag::kActivation, MpiTag::kGradient, MpiTag::kLensHidden, MpiTag::kGatherLogits,
                           MpiTag::kGatherHidden};

TEST(MpiTags, EveryKindAndIndexHasItsOwnTag) {
  std::set<int> seen;
  size_t count = 0;
  for (MpiTag kind : kAllTags)
    for (int64_t i = 0; i < tag_span(kind); ++i) {
      const int t = tag(kind, i);
      EXPECT_GE(t, 0);
      EXPECT_LE(t, 32767);  // the least MPI_TAG_UB an MPI library may offer
      seen.insert(t);
      ++count;
    }
  EXPECT_EQ(seen.size(), count);
}

TEST(MpiTags, RangesAsDocumented) {
  EXPECT_EQ(tag(MpiTag::kActivation, 3), 3);
  EXPECT_EQ(tag(MpiTag::kGradient, 3), 8192 + 3);
  EXPECT_EQ(tag(MpiTag::kLensHidden, 0), 1 << 14);
  EXPECT_NE(tag(MpiTag::kGatherLogits, 0), tag(MpiTag::kGatherHidden, 0));
  EXPECT_EQ(tag_span(MpiTag::kActivation), 8192);
  EXPECT_EQ(tag_span(MpiTag::kGatherHidden), 4096);
}

TEST(MpiTags, IndexOutsideItsKindIsRefused) {
  test::expect_user_error([] { tag(MpiTag::kActivation, 8192); }, {"8192", "micro-batches"});
  test::expect_user_error([] { tag(MpiTag::kLensHidden, 4096); }, {"4096"});
  test::expect_user_error([] { tag(MpiTag::kGatherHidden, -1); }, {"-1"});
}

}  // namespace
}  // namespace crash
