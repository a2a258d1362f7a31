import ParleyCore
import ParleyStore
import Testing

@Suite("Media conformance") struct MediaConformanceTests {
    private func clip(owner: String, conversation: String?, at time: Int64, bytes: Int = 6) -> VoiceClip {
        VoiceClip(
            id: ids.make(.voiceClip), owner: owner, stream: ids.make(.stream), conversation: conversation, room: nil,
            message: ids.make(.message), audio: (0..<bytes).map { UInt8(truncatingIfNeeded: $0 &* 37) }, createdAt: time)
    }

    /// A clip keeps every byte of its audio, is listed newest first without it, is saved and
    /// deleted only by its owner, and only unsaved clips older than the cutoff are purged.
    @Test(arguments: Backend.all)
    func clipsRoundTripPageAndArePurgedUnlessSaved(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let conversation = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(conversation)
            let old = clip(owner: "alice", conversation: conversation.id, at: 1_000, bytes: 300_000)
            let kept = clip(owner: "alice", conversation: conversation.id, at: 2_000)
            let new = clip(owner: "alice", conversation: conversation.id, at: 9_000)
            for clip in [old, kept, new] { try await store.saveClip(clip) }

            #expect(try await store.clip(id: old.id, owner: "alice", withAudio: true) == old)
            var listed = old
            listed.audio = []
            #expect(try await store.clip(id: old.id, owner: "alice", withAudio: false) == listed)
            #expect(try await store.clip(id: old.id, owner: "bob", withAudio: true) == nil)
            #expect(try await store.clips(owner: "alice", limit: 2, before: nil).map(\.id) == [new.id, kept.id])
            #expect(try await store.clips(owner: "alice", limit: 2, before: kept.id).map(\.id) == [old.id])
            #expect(try await store.clips(owner: "alice", limit: 5, before: nil).allSatisfy { $0.audio.isEmpty && $0.bytes > 0 })

            #expect(try await !store.setClipSaved(id: kept.id, owner: "bob", saved: true))
            #expect(try await store.setClipSaved(id: kept.id, owner: "alice", saved: true))
            #expect(try await store.purgeClips(createdBefore: 5_000, limit: 10) == 1, "the old unsaved one, not the saved one")
            #expect(try await store.clips(owner: "alice", limit: 5, before: nil).map(\.id) == [new.id, kept.id])
            #expect(try await store.clip(id: kept.id, owner: "alice", withAudio: false)?.saved == true)

            // A recording is the user's own voice: never purged by age, saved or not.
            var recording = clip(owner: "alice", conversation: nil, at: 1_000)
            recording.kind = .recording
            recording.contentType = "audio/webm;codecs=opus"
            try await store.saveClip(recording)
            #expect(try await store.clip(id: recording.id, owner: "alice", withAudio: true) == recording)
            #expect(try await store.purgeClips(createdBefore: 5_000, limit: 10) == 0)
            #expect(try await store.deleteClip(id: recording.id, owner: "alice"))

            #expect(try await !store.deleteClip(id: new.id, owner: "bob"))
            #expect(try await store.deleteClip(id: new.id, owner: "alice"))
            #expect(try await store.clips(owner: "alice", limit: 5, before: nil).map(\.id) == [kept.id])
        }
    }

    /// A clip goes with its conversation, with its clone's conversations, and with its owner.
    @Test(arguments: Backend.all)
    func clipsGoWithTheirConversationCloneAndAccount(_ backend: Backend) async throws {
        try await withStore(backend) { store in
            let clone = makeClone(owner: "alice")
            try await store.createClone(clone)
            let first = makeConversation(owner: "alice", clone: clone.id)
            let second = makeConversation(owner: "alice", clone: clone.id)
            try await store.createConversation(first)
            try await store.createConversation(second)
            let other = makeClone(owner: "alice", name: "Bob")
            try await store.createClone(other)
            let third = makeConversation(owner: "alice", clone: other.id)
            try await store.createConversation(third)
            let clips = [first, second, third].map { clip(owner: "alice", conversation: $0.id, at: 1_000) }
            for clip in clips { try await store.saveClip(clip) }

            #expect(try await store.deleteConversation(id: first.id, owner: "alice"))
            #expect(try await store.clip(id: clips[0].id, owner: "alice", withAudio: false) == nil)
            #expect(try await store.deleteClone(id: other.id, owner: "alice"))
            #expect(try await store.clip(id: clips[2].id, owner: "alice", withAudio: false) == nil)
            #expect(try await store.clip(id: clips[1].id, owner: "alice", withAudio: false) != nil)
            let report = try await store.deleteUser("alice", pseudonym: "gone-1")
            #expect(report.voiceClips == 1)
            #expect(try await store.clips(owner: "alice", limit: 5, before: nil).isEmpty)
        }
    }
}
